"""The shapes world: a CPU-scale text-to-image domain with verifiable rewards."""
