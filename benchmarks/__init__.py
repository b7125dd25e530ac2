"""Evaluation: prompt sets, judges, runner and reports."""
