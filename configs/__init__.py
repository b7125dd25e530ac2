"""Bundled YAML recipes (`visalign train METHOD --config NAME` finds them by name)."""
