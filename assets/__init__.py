"""Small bundled data: prompt sets and the shapes-world models."""
