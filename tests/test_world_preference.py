"""`benchmarks/world_preference.py`: DRO's expert pool on the shapes world follows the world protocol."""

from __future__ import annotations

import pytest

import visalign.pipelines.preference_data as preference_data
from visalign.benchmarks.world_preference import build_world_experts
from visalign.loading import load_generator
from visalign.pipelines.expert_sets import load_experts


@pytest.mark.parametrize(("family", "tokens"), [("sd", None), ("sd3", 16)])
def test_the_expert_pool_is_sampled_as_the_protocol_samples(tmp_path, monkeypatch, family, tokens):
    calls, sampled = [], set()
    sample_groups = preference_data.sample_groups

    def recording(pipe, prompts, **kwargs):
        calls.append(kwargs)
        sampled.update(prompts)
        return sample_groups(pipe, prompts, **kwargs)

    monkeypatch.setattr(preference_data, "sample_groups", recording)
    pipe = load_generator(f"world:{family}")[0]
    pipe.set_progress_bar_config(disable=True)
    record = build_world_experts(
        pipe,
        tmp_path / "experts",
        source="samples",
        prompts_per_category=1,
        images_per_prompt=2,
        k=12,
        per_caption=2,
        min_score=None,
        seed=0,
        steps=2,
    )
    assert len(calls) == 6  # one pool a category
    for kwargs in calls:
        # the flow model was trained with 16 zero "T5" tokens: the pipeline's default (256) samples another model
        assert kwargs.get("max_sequence_length") == tokens
        assert (kwargs["num_inference_steps"], kwargs["guidance_scale"], kwargs["height"]) == (2, 3.0, 32)
    assert record["pool"] == 12 and record["experts"] == 12  # no score floor: every image kept
    experts = load_experts(tmp_path / "experts")
    assert len(experts) == 12 and set(experts.captions) == sampled  # both images of each of the six pool prompts
    assert experts[0][1].shape == (3, 32, 32)
