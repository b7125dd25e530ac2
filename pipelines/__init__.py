"""Alignment methods: one module per method (config, pure math, trainer)."""
