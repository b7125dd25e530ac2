"""The generator layer on real tiny pipelines of every image family: pipeline parity at noise level 0, log-prob
recomputation, SDE windows, branching, one Rollout, and bad input."""

import pytest
import torch
from diffusers import DDIMScheduler

from visalign.generators import Rollout, adapter_for, seeded_generators
from visalign.generators.sd3 import SD3Adapter
from visalign.sampling import sde_step
from visalign.testing import tiny_pipeline

PROMPTS = ["a red square", "two blue circles", "a green triangle"]


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


def make_sampler(pipe, size=16):
    return adapter_for(pipe, height=size, width=size, max_sequence_length=8)


def sample(sampler, guidance_scale=4.5, steps=4, **kw):
    n = len(PROMPTS)
    latents = sampler.initial_latents(seeded_generators([(0, i) for i in range(n)]))
    conditioning = sampler.encode_prompts(PROMPTS, guidance_scale)
    return sampler.sample(
        PROMPTS, conditioning, latents, num_inference_steps=steps, guidance_scale=guidance_scale, **kw
    ), latents


@pytest.mark.parametrize(
    "family,size,guidance",
    [("sd3", 16, 4.5), ("sd3", 16, 1.0), ("flux", 32, 3.5), ("sd", 32, 4.5), ("sd", 32, 1.0), ("sdxl", 32, 4.5)],
)
def test_noise_level_zero_reproduces_the_pipeline(family, size, guidance):
    pipe = tiny_pipeline(family)
    sampler = make_sampler(pipe, size)
    if family in ("sd", "sdxl"):  # the sampler steps DDIM; the pipeline must too
        pipe.scheduler = DDIMScheduler.from_config(sampler.ddim.config)
    rollout, latents = sample(sampler, guidance_scale=guidance)
    options = {} if family in ("sd", "sdxl") else {"max_sequence_length": 8}
    expected = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance,
        height=size,
        width=size,
        latents=latents,
        output_type="pt",
        **options,
    ).images
    assert (rollout.images - expected).abs().max() <= 1e-5
    assert (rollout.stds == 0).all() and (rollout.log_probs == 0).all()
    assert rollout.stds.shape == rollout.log_probs.shape == (len(PROMPTS), 4)


def test_ddim_rollouts_rescore_their_transitions_and_keep_stds_per_sample():
    sampler = make_sampler(tiny_pipeline("sd"), 32)
    rollout, _ = sample(
        sampler, guidance_scale=2.0, noise_level=1.0, generator=seeded_generators([(3, i) for i in range(3)])
    )
    assert rollout.kind == "ddim" and rollout.stds.shape == (3, 4) and rollout.prev_timesteps is not None
    for step in range(4):
        out = sampler.log_prob(rollout, torch.tensor([1, 0]), step)
        torch.testing.assert_close(out.log_prob, rollout.log_probs[[1, 0], step], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ddim"):
        sampler.sample(
            PROMPTS,
            sampler.encode_prompts(PROMPTS),
            rollout.latents[:, 0],
            num_inference_steps=2,
            guidance_scale=1.0,
            kind="sde",
        )


def test_recomputed_log_probs_equal_the_sampled_ones_on_policy(sd3):
    sampler = make_sampler(sd3)
    rollout, _ = sample(sampler, noise_level=0.7, generator=seeded_generators([(1, i) for i in range(3)]))
    assert (rollout.stds > 0).all() and rollout.latents.shape == (3, 5, 4, 16, 16)
    all_rows, subset = torch.arange(3), torch.tensor([2, 0])
    for step in range(rollout.num_steps):
        same_batch = sampler.log_prob(rollout, all_rows, step)
        torch.testing.assert_close(same_batch.log_prob, rollout.log_probs[:, step], atol=1e-6, rtol=0)
        torch.testing.assert_close(same_batch.prev_sample, rollout.latents[:, step + 1], atol=0, rtol=0)
        other_batch = sampler.log_prob(rollout, subset, step)
        torch.testing.assert_close(other_batch.log_prob, rollout.log_probs[subset, step], atol=1e-5, rtol=0)
        torch.testing.assert_close(other_batch.mean, rollout.means[subset, step], atol=1e-5, rtol=0)


def test_log_prob_has_gradient_through_the_transformer(sd3):
    sampler = make_sampler(sd3)
    rollout, _ = sample(sampler, noise_level=0.7, generator=seeded_generators([(1, i) for i in range(3)]))
    weight = sd3.transformer.proj_out.weight
    weight.requires_grad_(True)
    try:
        sampler.log_prob(rollout, torch.arange(3), 1).log_prob.sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_sde_window_is_noisy_inside_and_euler_outside(sd3):
    sampler = make_sampler(sd3)
    rollout, _ = sample(
        sampler, noise_level=0.7, noise_steps=[1, 2], generator=seeded_generators([(1, i) for i in range(3)])
    )
    assert (rollout.stds[:, [1, 2]] > 0).all() and (rollout.stds[:, [0, 3]] == 0).all()
    assert (rollout.log_probs[:, [0, 3]] == 0).all()
    x, t = rollout.latents[:, 3], rollout.timesteps[3]
    velocity = sampler.guided(x, t, rollout.conditioning, rollout.guidance_scale)
    euler = sde_step(velocity, x, rollout.sigmas, 3, 0.0).prev_sample
    torch.testing.assert_close(rollout.latents[:, 4], euler, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="deterministic"):
        sampler.log_prob(rollout, torch.arange(3), 0)


def test_groups_share_initial_noise_when_keyed_by_group_but_not_sde_noise(sd3):
    sampler = make_sampler(sd3)
    group_ids = torch.tensor([0, 0, 1])
    latents = sampler.initial_latents(seeded_generators([(0, int(g)) for g in group_ids]))
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    rollout = sampler.sample(
        ["a red square"] * 3,
        sampler.encode_prompts(["a red square"] * 3, 4.5),
        latents,
        num_inference_steps=4,
        guidance_scale=4.5,
        noise_level=0.7,
        generator=seeded_generators([(1, i) for i in range(3)]),
        group_ids=group_ids,
    )
    assert torch.equal(rollout.group_ids, group_ids)
    assert not torch.equal(rollout.latents[0, -1], rollout.latents[1, -1])  # the SDE noise is each sample's own


def test_samples_do_not_depend_on_their_batch(sd3):
    """Per-sample generators make a sample the same in any batch, hence on any number of processes."""
    sampler = make_sampler(sd3)
    keys = [(0, i) for i in range(3)]
    kw = dict(num_inference_steps=4, guidance_scale=4.5, noise_level=0.7)
    together = sampler.sample(
        PROMPTS,
        sampler.encode_prompts(PROMPTS, 4.5),
        sampler.initial_latents(seeded_generators(keys)),
        generator=seeded_generators(keys),
        **kw,
    )
    alone = sampler.sample(
        PROMPTS[2:],
        sampler.encode_prompts(PROMPTS[2:], 4.5),
        sampler.initial_latents(seeded_generators(keys[2:])),
        generator=seeded_generators(keys[2:]),
        **kw,
    )
    torch.testing.assert_close(alone.latents[0], together.latents[2], atol=1e-5, rtol=0)


def test_branching_is_ode_then_one_sde_step_then_ode(sd3):
    sampler = make_sampler(sd3)
    ode, latents = sample(sampler)
    generators = seeded_generators([(2, i) for i in range(3)])
    branched = sampler.branch(
        PROMPTS,
        sampler.encode_prompts(PROMPTS, 4.5),
        latents,
        num_inference_steps=4,
        guidance_scale=4.5,
        noise_level=0.7,
        branch_steps=[2, 0],
        num_branches=2,
        generator=generators,
        group_ids=torch.tensor([10, 11, 12]),
    )
    t_count = 4
    assert len(branched) == 2 * 3 * 2 and branched.latents.shape == (12, 5, 4, 16, 16)
    # rows: branch step, then seed, then branch; a group is the children of one seed at one step
    steps = torch.tensor([0] * 6 + [2] * 6)
    seeds = torch.tensor([0, 0, 1, 1, 2, 2] * 2)
    assert torch.equal(branched.group_ids, (torch.tensor([10, 11, 12])[seeds] * t_count + steps))
    assert branched.prompts == [PROMPTS[s] for s in seeds.tolist()]
    for row, (k, s) in enumerate(zip(steps.tolist(), seeds.tolist())):
        noisy = (branched.stds[row] > 0).nonzero().flatten().tolist()
        assert noisy == [k]
        # before its branch step, a child is its seed's ODE trajectory
        torch.testing.assert_close(branched.latents[row, : k + 1], ode.latents[s, : k + 1], atol=1e-5, rtol=0)
    assert not torch.equal(branched.latents[0, 1], branched.latents[1, 1])  # siblings differ by their SDE noise
    for k in (0, 2):
        rows = (steps == k).nonzero().flatten()
        recomputed = sampler.log_prob(branched, rows, k)
        torch.testing.assert_close(recomputed.log_prob, branched.log_probs[rows, k], atol=1e-5, rtol=0)
    # after its branch step a child follows the ODE: the last transition is the Euler step
    x = branched.latents[:, 3]
    velocity = sampler.guided(x, branched.timesteps[3], branched.conditioning, 4.5)
    euler = sde_step(velocity, x, branched.sigmas, 3, 0.0).prev_sample
    torch.testing.assert_close(branched.latents[:, 4], euler, atol=1e-5, rtol=0)


def test_rollouts_select_and_concatenate(sd3):
    sampler = make_sampler(sd3)
    rollout, _ = sample(sampler, noise_level=0.7)
    both = Rollout.cat([rollout.select(torch.tensor([2])), rollout.select(torch.tensor([0, 1]))])
    assert both.prompts == [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    assert torch.equal(both.latents, rollout.latents[[2, 0, 1]])
    assert torch.equal(
        both.conditioning.negative_prompt_embeds, rollout.conditioning.negative_prompt_embeds[[2, 0, 1]]
    )
    other, _ = sample(sampler, noise_level=0.5)
    with pytest.raises(ValueError, match="share"):
        Rollout.cat([rollout, other])


class Sampler:  # not a diffusers pipeline
    pass


def test_bad_input_is_rejected(sd3):
    with pytest.raises(ValueError, match="needs a StableDiffusion3Pipeline, got StableDiffusionPipeline"):
        SD3Adapter(tiny_pipeline("sd"), height=16, width=16)
    with pytest.raises(ValueError, match="no generator adapter for a Sampler.*supported families: sd "):
        adapter_for(Sampler())
    with pytest.raises(ValueError, match="height. and .width. must be positive multiples of 2 for flux"):
        adapter_for(tiny_pipeline("flux"), height=31, width=32)
    sampler = make_sampler(sd3)
    latents = sampler.initial_latents(seeded_generators([(0, i) for i in range(3)]))
    conditioning = sampler.encode_prompts(PROMPTS, 4.5)
    kw = dict(num_inference_steps=4, guidance_scale=4.5)
    with pytest.raises(ValueError, match="one per sample"):
        sampler.sample(PROMPTS, conditioning, latents, generator=seeded_generators([(0, 0)]), **kw)
    with pytest.raises(ValueError, match="noise_steps"):
        sampler.sample(PROMPTS, conditioning, latents, noise_level=0.7, noise_steps=[4], **kw)
    with pytest.raises(ValueError, match="prompts"):
        sampler.sample(PROMPTS[:2], conditioning, latents, **kw)
    with pytest.raises(ValueError, match="branch_steps"):
        sampler.branch(PROMPTS, conditioning, latents, noise_level=0.7, branch_steps=[3], num_branches=2, **kw)
    with pytest.raises(ValueError, match="negative"):
        sampler.sample(
            PROMPTS, sampler.encode_prompts(PROMPTS, 1.0), latents, num_inference_steps=4, guidance_scale=4.5
        )


def test_conditioning_pads_masked_encodings_only():
    from visalign.generators import Conditioning

    short = Conditioning(torch.ones(1, 2, 4), prompt_embeds_mask=torch.ones(1, 2))
    long = Conditioning(torch.ones(1, 3, 4), prompt_embeds_mask=torch.ones(1, 3))
    both = Conditioning.cat([short, long])
    assert both.prompt_embeds.shape == (2, 3, 4) and both.prompt_embeds_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(RuntimeError):  # without masks, zero tokens would be attended to: never padded silently
        Conditioning.cat([Conditioning(torch.ones(1, 2, 4)), Conditioning(torch.ones(1, 3, 4))])
