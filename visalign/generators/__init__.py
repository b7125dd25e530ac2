"""The generator layer: one adapter per diffusers family behind one interface (`GeneratorAdapter`), one `Rollout`.

Adding a family is one file (a `GeneratorAdapter` subclass implementing `encode_prompts`, `initial_latents`,
`predict`, `decode`, `encode_images`, and `schedule`/`combine` where the family differs) and one line in `ADAPTERS`.
"""

from __future__ import annotations

import importlib
from typing import Any

from visalign.generators.base import GeneratorAdapter
from visalign.generators.rollout import Conditioning, Rollout, Schedule, seeded_generators

# diffusers pipeline class -> (family, "module:Adapter"); subclasses of a listed pipeline use its adapter.
ADAPTERS: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("sd", "visalign.generators.sd:SDAdapter"),
    "StableDiffusionXLPipeline": ("sdxl", "visalign.generators.sd:SDXLAdapter"),
    "StableDiffusion3Pipeline": ("sd3", "visalign.generators.sd3:SD3Adapter"),
    "FluxPipeline": ("flux", "visalign.generators.flux:FluxAdapter"),
    "QwenImagePipeline": ("qwen-image", "visalign.generators.qwen_image:QwenImageAdapter"),
    "WanPipeline": ("wan", "visalign.generators.wan:WanAdapter"),
}

__all__ = ["ADAPTERS", "Conditioning", "GeneratorAdapter", "Rollout", "Schedule", "adapter_for", "seeded_generators"]


def supported_families() -> str:
    return ", ".join(f"{family} ({cls})" for cls, (family, _) in ADAPTERS.items())


def adapter_for(pipe: Any, **options: Any) -> GeneratorAdapter:
    """The adapter of `pipe`'s family, built with `options` (`GeneratorAdapter`'s keyword arguments)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in ADAPTERS:
            module, name = ADAPTERS[cls.__name__][1].split(":")
            return getattr(importlib.import_module(module), name)(pipe, **options)
    raise ValueError(f"no generator adapter for a {type(pipe).__name__}; supported families: {supported_families()}")
