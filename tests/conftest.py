"""Shared test setup: offline Hub (any accidental download fails fast) and small fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tiny models gain nothing from threads, and on shared CPUs thread contention made the suite 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def pixels(generator: torch.Generator) -> torch.Tensor:
    """A batch of two random 32x32 RGB images `[2, 3, 32, 32]` in [0, 1]."""
    return torch.rand(2, 3, 32, 32, generator=generator)


@pytest.fixture
def prompts() -> list[str]:
    """Two prompts, one per image of `pixels`."""
    return ["a red square", "two blue circles"]
