"""Wan text-to-video through the generator layer: pipeline parity, video rollouts, video rewards, bad input.

All on the tiny offline `WanPipeline` of `visalign.testing` (9 frames of 16x16 pixels, latents `[B, 16, 3, 2, 2]`).
"""

import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler, WanPipeline
from test_reward_ocr import save_trocr

from visalign.generators import adapter_for, seeded_generators
from visalign.generators.wan import WanAdapter
from visalign.reward_models.ocr import OCRReward, ocr_reward, ocr_target
from visalign.reward_models.video import FrameAggregate
from visalign.rewards import RewardModel, load_reward
from visalign.testing import tiny_pipeline
from visalign.world.rewards import WorldDefectsReward

PROMPTS = ["a red square", "two blue circles"]
SIZE = dict(height=16, width=16, num_frames=9)
SETTINGS = dict(**SIZE, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return tiny_pipeline("wan")


def adapter(pipe: WanPipeline, **options) -> WanAdapter:
    return adapter_for(pipe, **{**SETTINGS, **options})


def initial(ad: WanAdapter, n: int = 2) -> torch.Tensor:
    return ad.initial_latents(seeded_generators([(0, i) for i in range(n)]))


class RecordingVideoReward(RewardModel):
    """A video reward that records the shape it was given (the mean brightness of the video)."""

    name = "recording-video"
    modalities = frozenset({"video"})

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def _score(self, pixels, prompts):
        self.seen.append(tuple(pixels.shape))
        return pixels.mean(dim=(1, 2, 3, 4))


# Wan2.1; Wan2.2 TI2V's per-token timesteps; DanceGRPO's single-frame Wan (`--t 1`)
@pytest.mark.parametrize(("expand_timesteps", "num_frames"), [(False, 9), (True, 9), (False, 1)])
@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_noise_level_zero_reproduces_the_pipeline(pipe, guidance_scale, expand_timesteps, num_frames):
    pipe = WanPipeline(**pipe.components, expand_timesteps=expand_timesteps)
    ad = adapter(pipe, num_frames=num_frames)
    assert type(ad) is WanAdapter and ad.video and ad.family == "wan"
    latents = initial(ad)
    assert latents.shape == (2, 16, (num_frames - 1) // 4 + 1, 2, 2) and latents.dtype == torch.float32
    cond = ad.encode_prompts(PROMPTS, guidance_scale)
    assert cond.has_negative == (guidance_scale > 1)
    rollout = ad.sample(PROMPTS, cond, latents, num_inference_steps=3, guidance_scale=guidance_scale)
    settings = {**SETTINGS, "num_frames": num_frames}
    call = dict(latents=latents.clone(), num_inference_steps=3, guidance_scale=guidance_scale, **settings)
    video = pipe(PROMPTS, output_type="pt", **call).frames
    final = pipe(PROMPTS, output_type="latent", **call).frames
    assert rollout.images.shape == video.shape == (2, num_frames, 3, 16, 16)
    assert (rollout.latents[:, -1] - final).abs().max() <= 1e-5
    assert (rollout.images - video).abs().max() <= 1e-5
    assert (rollout.stds == 0).all() and (rollout.log_probs == 0).all()
    if guidance_scale > 1:  # the guided output is not the unguided one: the comparison above sees CFG
        plain = pipe(PROMPTS, output_type="latent", **{**call, "guidance_scale": 1.0}).frames
        assert (plain - final).abs().max() > 1e-3


def test_rollout_log_probs_and_rescoring(pipe):
    ad = adapter(pipe)
    n, steps = 2, 3
    cond = ad.encode_prompts(PROMPTS, 4.5)
    gens = seeded_generators([(1, i) for i in range(n)])
    rollout = ad.sample(
        PROMPTS, cond, initial(ad), num_inference_steps=steps, guidance_scale=4.5, noise_level=0.7, generator=gens
    )
    assert rollout.log_probs.shape == rollout.stds.shape == (n, steps)
    assert (rollout.stds > 0).all() and torch.isfinite(rollout.log_probs).all()
    assert rollout.latents.shape == (n, steps + 1, 16, 3, 2, 2)
    assert rollout.images.shape == (n, 9, 3, 16, 16)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1
    rows = torch.tensor([1, 0])
    for step in range(steps):
        out = ad.log_prob(rollout, rows, step)
        torch.testing.assert_close(out.log_prob, rollout.log_probs[rows, step], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.mean, rollout.means[rows, step], atol=1e-5, rtol=1e-5)
    ad.model.zero_grad()
    ad.log_prob(rollout, rows, 0).log_prob.sum().backward()
    grads = [p.grad for p in ad.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    ad.model.zero_grad()


def test_video_rewards_receive_videos_and_reject_images(pipe):
    ad = adapter(pipe)
    rollout = ad.sample(PROMPTS, ad.encode_prompts(PROMPTS), initial(ad), num_inference_steps=2, guidance_scale=1.0)
    video_reward = RecordingVideoReward()
    scores = video_reward.score(rollout.images, rollout.prompts).score
    assert video_reward.seen == [(2, 9, 3, 16, 16)] and scores.shape == (2,)
    frames = FrameAggregate(WorldDefectsReward(), num_frames=4).score(rollout.images, rollout.prompts)
    assert frames.extras["frame_scores"].shape == (2, 4)
    images = rollout.images[:, 0]
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\].*\(2, 3, 16, 16\)"):
        video_reward.score(images, rollout.prompts)
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\].*\(2, 3, 16, 16\)"):
        FrameAggregate(WorldDefectsReward()).score(images, rollout.prompts)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 9, 3, 16, 16\)"):
        WorldDefectsReward().score(rollout.images, rollout.prompts)
    assert video_reward.seen == [(2, 9, 3, 16, 16)]  # the rejected calls never reached the model


def test_video_ocr_is_flow_grpos_every_fourth_frame_of_33(tmp_path):
    reward = load_reward("video-ocr", str(save_trocr(tmp_path / "trocr")), max_new_tokens=4)
    assert isinstance(reward, FrameAggregate) and isinstance(reward.reward, OCRReward)
    videos = torch.rand(2, 33, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ['a sign "ab"', 'a label "Hi"']
    out = reward.score(videos, prompts)
    assert out.extras["frame_indices"].tolist() == list(range(0, 33, 4))
    recognized = out.extras["frame_extras"]["recognized"]  # per frame, video-major
    per_frame = torch.tensor([ocr_reward(r, ocr_target(prompts[i // 9])) for i, r in enumerate(recognized)])
    torch.testing.assert_close(out.score, per_frame.view(2, 9).mean(dim=1))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        reward.score(videos[:, 0], prompts)


def test_encode_images_inverts_the_decode_normalization(pipe):
    ad = adapter(pipe)
    videos = torch.rand(2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = ad.encode_images(videos)
    assert latents.shape == (2, 16, 3, 2, 2) and latents.dtype == torch.float32
    # diffusers' own preprocessing: [B, F, 3, H, W] in [0, 1] -> [B, 3, F, H, W] in [-1, 1]
    video = pipe.video_processor.preprocess_video(videos, height=16, width=16)
    raw = pipe.vae.encode(video).latent_dist.mean
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents * std + mean, raw, atol=1e-5, rtol=1e-5)
    # the denoising objective (DPO/DRO) runs on these latents: per-sample errors with gradient
    t = ad.sample_timesteps(2, torch.Generator().manual_seed(0))
    errors = ad.errors(latents, torch.randn_like(latents), t, ad.encode_prompts(PROMPTS))
    assert errors.shape == (2,) and errors.requires_grad
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        ad.encode_images(videos[:, 0])
    with pytest.raises(ValueError, match="8 frames"):
        ad.encode_images(videos[:, :8])


def test_unipc_checkpoints_step_on_unipc_flow_sigmas(pipe):
    """Released checkpoints ship a flow UniPC scheduler: we step on its sigma grid (Flow-GRPO's Wan SDE grid)."""
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ad = adapter(WanPipeline(**{**pipe.components, "scheduler": unipc}))
    schedule = ad.schedule(20)
    unipc.set_timesteps(20)
    assert schedule.sigmas.shape == (21,) and schedule.sigmas[0] == 1 and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.sigmas, unipc.sigmas.float(), atol=2e-6, rtol=0)  # UniPC's 1 - 1e-6
    assert (schedule.timesteps - unipc.timesteps.float()).abs().max() <= 1  # UniPC truncates to integers
    assert ad.flow_scheduler.config.shift == 3.0
    # training sigmas carry the same shift: shifted draws lie above the unshifted ones
    shifted = ad.sample_timesteps(64, torch.Generator().manual_seed(0))
    plain = adapter(pipe).sample_timesteps(64, torch.Generator().manual_seed(0))  # the tiny pipe's shift is 7
    assert (shifted < plain).all()
    cond = ad.encode_prompts(PROMPTS)
    rollout = ad.sample(PROMPTS, cond, initial(ad), num_inference_steps=3, guidance_scale=1.0, noise_level=0.7)
    assert (rollout.stds > 0).all() and torch.isfinite(rollout.log_probs).all()


def test_bad_input(pipe):
    for frames in (8, 0, 10):
        with pytest.raises(ValueError, match="num_frames"):
            adapter(pipe, num_frames=frames)
    with pytest.raises(ValueError, match="height"):
        adapter(pipe, height=24)
    epsilon = WanPipeline(**{**pipe.components, "scheduler": DDIMScheduler()})
    with pytest.raises(ValueError, match="DDIMScheduler"):
        adapter(epsilon)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
        adapter(WanPipeline(**{**pipe.components, "scheduler": UniPCMultistepScheduler()}))
    two_experts = WanPipeline(**{**pipe.components, "transformer_2": pipe.transformer}, boundary_ratio=0.9)
    with pytest.raises(ValueError, match="transformer_2"):
        adapter(two_experts)
    ad = adapter(pipe)
    assert ad.num_frames == 9 and ad.max_sequence_length == 16
    default = WanAdapter(pipe)  # the pipeline's own defaults
    assert (default.height, default.width, default.num_frames, default.max_sequence_length) == (480, 832, 81, 512)
