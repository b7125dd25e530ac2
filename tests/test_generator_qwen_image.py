"""The Qwen-Image adapter on a real tiny `QwenImagePipeline` (offline tokenizer and Qwen2.5-VL encoder): pipeline
parity at noise level 0 with and without true CFG, rollouts that re-score their transitions, pixels <-> latents,
`detach_uncond`, and bad input."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

from visalign.generators import Conditioning, GeneratorAdapter, Rollout, adapter_for, seeded_generators
from visalign.generators.qwen_image import QwenImageAdapter
from visalign.testing import load_tiny, save_tiny, tiny_pipeline

PROMPTS = ["a red square", "two blue circles on the left of a big green triangle"]  # 8 and 16 tokens
SIZE = 32  # vae_scale_factor 4: 16 packed tokens of 16 channels
# The dynamic-shift constants of Qwen/Qwen-Image's scheduler config (exponential shift, `mu` from the resolution,
# stretched to a terminal sigma of 0.02), so that the schedule the pipeline builds is not the trivial one.
QWEN_SCHEDULER = dict(
    use_dynamic_shifting=True,
    time_shift_type="exponential",
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny pipeline saved in the official layout and loaded back by `QwenImagePipeline.from_pretrained`."""
    folder = save_tiny(tiny_pipeline("qwen-image"), tmp_path_factory.mktemp("qwen") / "qwen-image")
    pipe = load_tiny("qwen-image", folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    return pipe


def make_adapter(pipe, **options):
    return adapter_for(pipe, height=SIZE, width=SIZE, **options)


def test_registry_gives_the_qwen_image_adapter_with_the_pipelines_defaults(pipe):
    adapter = make_adapter(pipe)
    assert isinstance(adapter, QwenImageAdapter) and adapter.family == "qwen-image"
    assert adapter.negative_prompt == " " and adapter.max_sequence_length == 512
    assert adapter.image_seq_len() == (SIZE // 8) ** 2
    latents = adapter.initial_latents(seeded_generators([(0, 0), (0, 1)]))
    assert latents.shape == (2, adapter.image_seq_len(), 16) and latents.dtype == torch.float32


@pytest.mark.parametrize(
    "prompts,negative_prompt,guidance",
    [
        (PROMPTS, "bad quality", 1.0),  # no CFG
        (PROMPTS, "bad quality", 4.0),  # true CFG, encodings of different lengths: two passes
        (["red", "two"], "a red", 4.0),  # true CFG, encodings of one length: one doubled batch
    ],
)
def test_noise_level_zero_reproduces_the_pipeline(pipe, prompts, negative_prompt, guidance):
    adapter = make_adapter(pipe, negative_prompt=negative_prompt)
    cond = adapter.encode_prompts(prompts, guidance)
    if guidance > 1:
        same = cond.negative_prompt_embeds.shape[1] == cond.prompt_embeds.shape[1]
        assert same == (negative_prompt == "a red")  # each CFG path is exercised
    latents = adapter.initial_latents(seeded_generators([(1, i) for i in range(len(prompts))]))
    rollout = adapter.sample(prompts, cond, latents, num_inference_steps=3, guidance_scale=guidance)
    options = dict(
        latents=latents,
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        true_cfg_scale=guidance,
        negative_prompt=negative_prompt if guidance > 1 else None,
    )
    expected_latents = pipe(prompts, output_type="latent", **options).images
    expected = pipe(prompts, output_type="pt", **options).images
    assert (rollout.latents[:, -1] - expected_latents).abs().max() <= 1e-5
    assert (rollout.images - expected).abs().max() <= 1e-5
    assert rollout.images.shape == (len(prompts), 3, SIZE, SIZE) and rollout.images.std() > 0.01
    assert (rollout.stds == 0).all() and (rollout.log_probs == 0).all()


def test_true_cfg_rescales_to_the_conditional_norm(pipe):
    uncond, text = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    adapter = make_adapter(pipe)
    out = adapter.combine(uncond, text, 4.0)
    plain = uncond + 4.0 * (text - uncond)
    torch.testing.assert_close(out.norm(dim=-1), text.norm(dim=-1))
    torch.testing.assert_close(out / out.norm(dim=-1, keepdim=True), plain / plain.norm(dim=-1, keepdim=True))
    assert not torch.allclose(out, GeneratorAdapter.combine(adapter, uncond, text, 4.0))


def test_rollouts_rescore_their_transitions_after_concatenation(pipe):
    adapter = make_adapter(pipe)
    parts = []
    for seed, prompts in enumerate([PROMPTS[:1], PROMPTS[1:]]):  # 8 and 16 prompt tokens: padded when concatenated
        cond = adapter.encode_prompts(prompts, 4.0)
        n = len(prompts)
        parts.append(
            adapter.sample(
                prompts,
                cond,
                adapter.initial_latents(seeded_generators([(seed, i) for i in range(n)])),
                num_inference_steps=4,
                guidance_scale=4.0,
                noise_level=1.2,
                noise_steps=[0, 1],
                generator=seeded_generators([(seed, 9, i) for i in range(n)]),
            )
        )
    rollout = Rollout.cat(parts)
    assert rollout.conditioning.prompt_embeds.shape[1] == parts[1].conditioning.prompt_embeds.shape[1]
    assert rollout.log_probs.shape == rollout.stds.shape == (2, 4)
    assert (rollout.stds[:, :2] > 0).all() and (rollout.stds[:, 2:] == 0).all()
    assert (rollout.log_probs[:, 2:] == 0).all()
    for step in (0, 1):
        for rows in (torch.tensor([0]), torch.tensor([1, 0])):
            out = adapter.log_prob(rollout, rows, step)
            torch.testing.assert_close(out.log_prob, rollout.log_probs[rows, step], rtol=1e-5, atol=1e-5)
    moved = adapter.log_prob(rollout, torch.tensor([0, 1]), 0)
    assert torch.equal(moved.prev_sample, rollout.latents[:, 1])
    with pytest.raises(ValueError, match="deterministic"):
        adapter.log_prob(rollout, torch.tensor([0]), 2)


def test_encode_images_inverts_decode_in_layout_and_matches_the_edit_pipeline(pipe):
    adapter = make_adapter(pipe)
    latents = adapter.initial_latents(seeded_generators([(2, 0), (2, 1)]))
    pixels = adapter.decode(latents)
    assert pixels.shape == (2, 3, SIZE, SIZE) and 0 <= pixels.min() and pixels.max() <= 1
    encoded = adapter.encode_images(pixels)
    assert encoded.shape == latents.shape and encoded.dtype == torch.float32
    assert adapter.decode(encoded).shape == pixels.shape
    # QwenImageEditPipeline's own VAE encoding of a condition image (posterior mode, then (z - mean) / std), packed
    vae = pipe.vae
    edit = types.SimpleNamespace(vae=vae, latent_channels=vae.config.z_dim)
    reference = QwenImageEditPipeline._encode_vae_image(edit, (pixels * 2 - 1).unsqueeze(2), None)
    b, c, _, h, w = reference.shape
    torch.testing.assert_close(encoded, pipe._pack_latents(reference, b, c, h, w), rtol=1e-5, atol=1e-5)
    sampled = make_adapter(pipe, vae_sample_posterior=True).encode_images(pixels, torch.Generator().manual_seed(0))
    assert sampled.shape == encoded.shape and not torch.allclose(sampled, encoded)


@pytest.mark.parametrize("prompts,negative_prompt", [(PROMPTS, " "), (["red", "two"], "a red")])
def test_detach_uncond_keeps_the_value_and_changes_the_gradient(pipe, prompts, negative_prompt):
    adapter = make_adapter(pipe, negative_prompt=negative_prompt)
    cond = adapter.encode_prompts(prompts, 4.0)
    x = adapter.initial_latents(seeded_generators([(5, i) for i in range(len(prompts))]))
    weight = adapter.model.proj_out.weight
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # not a norm: the rescale keeps those
    values, grads = [], []
    for detach in (False, True):
        adapter.model.zero_grad(set_to_none=True)
        out = adapter.guided(x, torch.tensor(700.0), cond, 4.0, detach_uncond=detach)
        (out * probe).sum().backward()
        values.append(out.detach())
        grads.append(weight.grad.clone())
    adapter.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(values[0], values[1])
    assert grads[1].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])


def test_bad_input_is_rejected(pipe):
    with pytest.raises(ValueError, match="`height` and `width`"):
        adapter_for(pipe, height=36, width=SIZE)  # a multiple of the VAE's 4 but not of the packed 8
    with pytest.raises(ValueError, match="max_sequence_length"):
        adapter_for(pipe, height=SIZE, width=SIZE, max_sequence_length=2048)
    adapter = make_adapter(pipe)
    with pytest.raises(ValueError, match="`latents`"):
        adapter.decode(torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="`pixels`"):
        adapter.encode_images(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="`pixels`"):
        adapter.encode_images(torch.full((1, 3, SIZE, SIZE), 2.0))
    cond = adapter.encode_prompts(PROMPTS[:1])  # encoded without negatives
    assert isinstance(cond, Conditioning) and not cond.has_negative
    with pytest.raises(ValueError, match="negative"):
        adapter.guided(adapter.initial_latents(seeded_generators([(0,)])), torch.tensor(500.0), cond, 4.0)


def test_branching_and_the_denoising_objective_run_on_qwen_image(pipe):
    adapter = make_adapter(pipe)
    cond = adapter.encode_prompts(PROMPTS, 4.0)
    seeds = adapter.initial_latents(seeded_generators([(6, i) for i in range(2)]))
    children = adapter.branch(
        PROMPTS,
        cond,
        seeds,
        num_inference_steps=3,
        guidance_scale=4.0,
        noise_level=1.2,
        branch_steps=[0, 1],
        num_branches=2,
        generator=seeded_generators([(6, 9, i) for i in range(2)]),
    )
    assert len(children) == 8 and children.images.shape == (8, 3, SIZE, SIZE)
    assert ((children.stds > 0).sum(dim=1) == 1).all()
    for step, rows in ((0, torch.arange(4)), (1, torch.arange(4, 8))):
        out = adapter.log_prob(children, rows, step)
        torch.testing.assert_close(out.log_prob, children.log_probs[rows, step], rtol=1e-5, atol=1e-5)
    # Diffusion-DPO/DRO's objective: clean latents from pixels, flow targets at logit-normal sigmas, with gradient
    x0 = adapter.encode_images(children.images[:2])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    t = adapter.sample_timesteps(2, generator)
    errors = adapter.errors(x0, noise, t, adapter.encode_prompts(PROMPTS))
    assert errors.shape == (2,) and (errors > 0).all()
    errors.sum().backward()
    assert adapter.model.proj_out.weight.grad.abs().sum() > 0
    adapter.model.zero_grad(set_to_none=True)
