"""Diffusion-DPO: the loss against float64 references and its identities, the denoising targets, and the trainer on
real tiny pipelines (learning, resume, online pairs, SDXL and SD3, the `visalign train` command)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from preference_helpers import (
    LORA,
    Redness,
    hub_snapshot,
    red_blue_images,
    red_over_blue_pairs,
    sharp_tiny_pipeline,
    trained_weights,
)

from visalign.cli import main
from visalign.generators import adapter_for
from visalign.generators.objective import forward_noise, logit_normal_sigmas, per_sample_mse, prediction_target
from visalign.pipelines.dpo import DPOConfig, DPOTrainer, dpo_loss
from visalign.pipelines.pickapic import load_pairs, save_pairs
from visalign.pipelines.preference_data import IndexSampler, PreferencePairs
from visalign.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def errors(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) + 0.5 for _ in range(4)]


def reference_dpo(model_w, model_l, ref_w, ref_l, beta, kind):
    """The official `train.py` (sigmoid, paper units) and diffusers' hinge / IPO (beta' = beta / 2), in numpy."""
    model_w, model_l, ref_w, ref_l = (np.asarray(t, dtype=np.float64) for t in (model_w, model_l, ref_w, ref_l))
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    logits = (ref_w - ref_l) - (model_w - model_l)
    diffusers_beta = beta / 2
    if kind == "sigmoid":
        losses = np.log1p(np.exp(-inside))
    elif kind == "hinge":
        losses = np.maximum(0.0, 1 - diffusers_beta * logits)
    else:
        losses = (logits - 1 / (2 * diffusers_beta)) ** 2
    return losses.mean(), np.mean((logits > 0) + 0.5 * (logits == 0))


def dpo_config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        pretrained_model_name_or_path="tiny:sd",
        height=32,
        width=32,
        max_sequence_length=8,
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-3,
        beta=500.0,
        caption_dropout=0.0,
        **LORA,
    )
    return DPOConfig(**{**base, **kw})


# -- the loss ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1e-3, 1.0, 100.0, 5000.0, 1e7])
def test_model_equal_to_reference_gives_ln2_for_any_beta(beta):
    winner, loser, _, _ = errors()
    loss, accuracy = dpo_loss(winner, loser, winner.clone(), loser.clone(), beta)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(math.log(2), abs=1e-15)
    assert float(accuracy) == 0.5  # every pair a tie, counted 1/2


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [2.0, 500.0, 5000.0])
def test_dpo_loss_matches_independent_float64_computation(kind, beta):
    model_w, model_l, ref_w, ref_l = errors(seed=1)
    model_w = model_w * 1e-3 + ref_w  # errors within beta's range, as in training
    model_l = model_l * 1e-3 + ref_l
    loss, accuracy = dpo_loss(model_w, model_l, ref_w, ref_l, beta, kind=kind)
    expected, expected_accuracy = reference_dpo(model_w, model_l, ref_w, ref_l, beta, kind)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(accuracy) == pytest.approx(expected_accuracy)


def test_paper_beta_is_twice_the_diffusers_beta():
    model_w, model_l, ref_w, ref_l = errors(seed=2)
    logits = (ref_w - ref_l) - (model_w - model_l) * 1.001
    diffusers = torch.nn.functional.logsigmoid(2500 * logits).neg().mean()  # train_diffusion_dpo.py, beta_dpo=2500
    ours, _ = dpo_loss(model_w * 1.001, model_l * 1.001, ref_w, ref_l, 5000.0)
    assert float(ours) == pytest.approx(float(diffusers), rel=1e-12)


def test_gradient_lowers_the_winner_error_raises_the_loser_error_and_skips_the_reference():
    model_w, model_l, ref_w, ref_l = (t.requires_grad_() for t in errors(seed=3))
    loss, _ = dpo_loss(model_w, model_l, ref_w, ref_l, 50.0)
    loss.backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()
    assert ref_w.grad is None and ref_l.grad is None


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_rpo_adds_the_weighted_winner_error_in_float64(kind):
    model_w, model_l, ref_w, ref_l = errors(seed=4)
    model_w = model_w * 1e-3 + ref_w
    model_l = model_l * 1e-3 + ref_l
    loss, accuracy = dpo_loss(model_w, model_l, ref_w, ref_l, 500.0, kind=kind, rpo_alpha=125.0)
    expected, expected_accuracy = reference_dpo(model_w, model_l, ref_w, ref_l, 500.0, kind)
    assert float(loss) == pytest.approx(expected + 125.0 * sum(model_w.tolist()) / len(model_w), rel=1e-12)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    plain, _ = dpo_loss(model_w, model_l, ref_w, ref_l, 500.0, kind=kind, rpo_alpha=0.0)
    assert float(plain) == pytest.approx(expected, rel=1e-12)


def test_rpo_penalizes_raising_both_errors_which_plain_dpo_rewards():
    # the model raises both errors, the loser's more: plain DPO gains from it, RPO at beta / 2 loses
    ref = torch.full((4,), 0.04, dtype=torch.float64)
    model_w, model_l = (ref + 0.002).requires_grad_(), (ref + 0.004).requires_grad_()
    plain, _ = dpo_loss(model_w, model_l, ref, ref.clone(), 500.0)
    rpo, _ = dpo_loss(model_w, model_l, ref, ref.clone(), 500.0, rpo_alpha=250.0)
    at_reference, _ = dpo_loss(ref, ref.clone(), ref, ref.clone(), 500.0, rpo_alpha=250.0)
    assert float(plain) < math.log(2) and float(rpo) > float(at_reference)
    rpo.backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()


def test_implicit_accuracy_counts_the_pairs_the_model_ranks_better_than_the_reference():
    ref = torch.ones(4, dtype=torch.float64)
    model_w = torch.tensor([0.9, 1.1, 1.0, 0.5], dtype=torch.float64)
    _, accuracy = dpo_loss(model_w, ref.clone(), ref, ref.clone(), 10.0)
    assert float(accuracy) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=0.0), "`beta` must be a finite number > 0"),
        (dict(beta=float("inf")), "`beta`"),
        (dict(kind="dpo"), "`kind` must be one of"),
        (dict(rpo_alpha=-1.0), "`rpo_alpha` must be a finite number >= 0"),
        (dict(rpo_alpha=float("nan")), "`rpo_alpha`"),
        (dict(model_err_l=torch.ones(3)), "`model_err_l` must have the shape of `model_err_w`"),
        (dict(ref_err_w=torch.ones(4, 2)), "`ref_err_w` must be a non-empty 1-D float tensor"),
    ],
)
def test_dpo_loss_bad_inputs_raise(kw, match):
    args = dict(model_err_w=torch.ones(4), model_err_l=torch.ones(4), ref_err_w=torch.ones(4), ref_err_l=torch.ones(4))
    beta = kw.pop("beta", 5000.0)
    kind = kw.pop("kind", "sigmoid")
    with pytest.raises(ValueError, match=match):
        dpo_loss(**{**args, **kw}, beta=beta, kind=kind)


# -- the denoising objective ------------------------------------------------------------------------------------------


def test_forward_noise_and_targets_match_diffusers_and_flow_matching_in_float64():
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    acp = scheduler.alphas_cumprod.double()
    for target in ("epsilon", "v_prediction"):
        x_t = forward_noise(x0, noise, t, target=target, alphas_cumprod=acp)
        torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t), rtol=1e-12, atol=1e-12)
    v = prediction_target(x0, noise, t, target="v_prediction", alphas_cumprod=acp)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t), rtol=1e-12, atol=1e-12)
    assert torch.equal(prediction_target(x0, noise, t, target="epsilon", alphas_cumprod=acp), noise)
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_sigma = forward_noise(x0, noise, sigma, target="flow")
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_sigma, (1 - s) * x0 + s * noise, rtol=0, atol=0)
    assert torch.equal(prediction_target(x0, noise, sigma, target="flow"), noise - x0)
    mse = per_sample_mse(x0, noise)
    np.testing.assert_allclose(mse.numpy(), ((x0 - noise) ** 2).numpy().reshape(3, -1).mean(1), rtol=1e-14)
    with pytest.raises(ValueError, match="integer timesteps"):
        forward_noise(x0, noise, sigma, target="epsilon", alphas_cumprod=acp)
    with pytest.raises(ValueError, match="sigmas in \\[0, 1\\]"):
        forward_noise(x0, noise, t, target="flow")


def test_logit_normal_sigmas_are_sd3s_density_with_the_scheduler_shift():
    g = torch.Generator().manual_seed(0)
    sigmas = logit_normal_sigmas(20000, generator=g)
    assert 0 < float(sigmas.min()) and float(sigmas.max()) < 1
    assert float(sigmas.median()) == pytest.approx(0.5, abs=0.01)
    shifted = logit_normal_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * sigmas / (1 + 2 * sigmas))


@pytest.mark.parametrize(
    "family, target",
    [("sd", "epsilon"), ("sdxl", "epsilon"), ("sd3", "flow"), ("flux", "flow"), ("qwen-image", "flow")],
)
def test_denoiser_errors_on_every_family(family, target):
    d = adapter_for(tiny_pipeline(family), height=32, width=32, max_sequence_length=8)
    assert d.target == target
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x0 = d.encode_images(pixels, torch.Generator().manual_seed(0))
    t = d.sample_timesteps(2, torch.Generator().manual_seed(0))
    err = d.errors(x0, torch.randn_like(x0), t, d.encode_prompts(["a red square", "a blue circle"]))
    assert err.shape == (2,) and torch.isfinite(err).all()
    assert t.is_floating_point() == (target == "flow")


def test_images_encode_to_the_posterior_mean_unless_sampling_is_asked():
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pipe = tiny_pipeline("sd")
    mean = adapter_for(pipe, height=32, width=32)
    a, b = (mean.encode_images(pixels, torch.Generator().manual_seed(s)) for s in (0, 1))
    expected = pipe.vae.encode(pixels * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(b, expected)
    sampled = adapter_for(pipe, height=32, width=32, vae_sample_posterior=True)
    c, d = (sampled.encode_images(pixels, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.allclose(c, d) and not torch.allclose(c, expected)


# -- the trainer ------------------------------------------------------------------------------------------------------


def implicit_accuracy(trainer, n):
    with torch.no_grad():
        _, stats = trainer.pair_loss(list(range(n)), [(10**6, k) for k in range(n)])  # fixed held-out noise
    return stats["train/implicit_accuracy"]


def test_short_dpo_run_raises_implicit_accuracy_on_fresh_noise(tmp_path):
    pairs = red_over_blue_pairs(32)
    trainer = DPOTrainer(sharp_tiny_pipeline("sd"), dpo_config(tmp_path, max_steps=25, use_lora=False), pairs=pairs)
    assert implicit_accuracy(trainer, 32) == 0.5  # model = reference: every pair a tie
    history = trainer.train()
    assert implicit_accuracy(trainer, 32) >= 0.85
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # float32: the copy's kernels differ
    late = [h["train/mse_gap_w"] - h["train/mse_gap_l"] for h in history[-5:]]
    assert np.mean(late) < 0  # the winners' error fell further below the reference's than the losers'


def test_rpo_alpha_adds_the_winner_error_to_the_loss_and_holds_it_below_plain_dpo(tmp_path):
    pairs, histories = red_over_blue_pairs(32), {}
    for alpha in (None, 50.0):
        config = dpo_config(tmp_path / str(alpha), max_steps=12, use_lora=False, rpo_alpha=alpha)
        histories[alpha] = DPOTrainer(sharp_tiny_pipeline("sd"), config, pairs=pairs).train()
    first = histories[50.0][0]
    assert first["train/loss"] == pytest.approx(math.log(2) + 50.0 * first["train/model_mse_w"], rel=1e-4)
    late_gap = {a: np.mean([h["train/mse_gap_w"] for h in history[-4:]]) for a, history in histories.items()}
    assert late_gap[50.0] < late_gap[None] and late_gap[50.0] < 0


def test_lora_dpo_changes_only_the_adapters_and_the_adapter_loads(tmp_path):
    pipe = sharp_tiny_pipeline("sd")
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    trainer = DPOTrainer(pipe, dpo_config(tmp_path, learning_rate=3e-2), pairs=red_over_blue_pairs(8))
    before = trained_weights(trainer)
    trainer.train()
    after = trained_weights(trainer)
    assert all("lora" in n for n in after) and any(not torch.equal(before[n], after[n]) for n in after)
    with trainer.engine.reference() as reference:  # the reference is the untouched base model
        for n, p in reference.named_parameters():
            if "lora" not in n:
                assert torch.equal(p, base[n.replace(".base_layer", "")])
    fresh = tiny_pipeline("sd")
    fresh.load_lora_weights(tmp_path / "run" / "final")


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    kw = dict(
        max_steps=4,
        save_steps=2,
        caption_dropout=0.5,
        per_device_train_batch_size=4,
        ema_decay=0.5,
        ema_update_every=1,
    )
    pairs = red_over_blue_pairs(6)  # epochs of 6 pairs do not align with batches of 4
    uninterrupted = DPOTrainer(sharp_tiny_pipeline(), dpo_config(tmp_path / "a", **kw), pairs=pairs)
    uninterrupted.train()

    crashing = DPOTrainer(sharp_tiny_pipeline(), dpo_config(tmp_path / "b", **kw), pairs=pairs)
    crashing.pairs = Crashing(crashing.pairs, crash_at=2 * 4 + 3)  # dies reading step 3's pairs
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()
    resumed = DPOTrainer(sharp_tiny_pipeline(), dpo_config(tmp_path / "b", resume_from="latest", **kw), pairs=pairs)
    history = resumed.train()
    assert [m["step"] for m in history] == [3, 4]
    expected = trained_weights(uninterrupted)
    assert all(torch.equal(p, expected[n]) for n, p in trained_weights(resumed).items())


class Crashing:
    """A pair set that fails on its `crash_at`-th read."""

    def __init__(self, pairs, crash_at):
        self.pairs, self.reads, self.crash_at = pairs, 0, crash_at

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.crash_at:
            raise RuntimeError("killed")
        return self.pairs[i]


def test_online_pairs_are_built_from_the_current_model_saved_and_rebuilt(tmp_path):
    config = dpo_config(
        tmp_path,
        max_steps=3,
        rebuild_every=2,
        prompts_per_round=2,
        num_images_per_prompt=3,
        num_inference_steps=2,
        guidance_scale=1.0,
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(sharp_tiny_pipeline(), config, reward=Redness(), prompts=["a red square", "a blue circle"])
    trainer.train()
    built = sorted(p.name for p in (tmp_path / "run" / "pairs").iterdir())
    assert built == ["step-0", "step-2"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "pairs" / "step-0" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["score_0"] > r["score_1"] for r in rows)
    assert len(load_pairs(tmp_path / "run" / "pairs" / "step-2")) == 2


def test_online_pairs_resumed_in_a_copy_of_the_run_end_with_the_uninterrupted_weights(tmp_path):
    """Online pairs, resumed mid-epoch of the pair sampler (3 pairs, batches of 2) in a copied run folder whose
    original pairs are gone, through a rebuild from the EMA weights: bitwise the uninterrupted run (one process, the
    same float32 operations in the same order from exactly restored weights, optimizer, EMA and sampler states)."""
    kw = dict(
        max_steps=5,
        save_steps=1,
        rebuild_every=3,
        prompts_per_round=3,
        num_images_per_prompt=3,
        num_inference_steps=2,
        guidance_scale=1.0,
        per_device_train_batch_size=2,
        caption_dropout=0.5,
        ema_decay=0.5,
        ema_update_every=1,
    )
    prompts = ["a red square", "a blue circle", "a red circle"]
    uninterrupted = DPOTrainer(
        sharp_tiny_pipeline(), dpo_config(tmp_path / "a", **kw), reward=Redness(), prompts=prompts
    )
    uninterrupted.train()
    assert sorted(p.name for p in (tmp_path / "a" / "run" / "pairs").iterdir()) == ["step-0", "step-3"]

    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.rmtree(tmp_path / "a" / "run" / "pairs")  # the copy must read its own pairs
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "checkpoint-1"
    config = dpo_config(tmp_path / "b", resume_from=str(checkpoint), **kw)
    resumed = DPOTrainer(sharp_tiny_pipeline(), config, reward=Redness(), prompts=prompts)
    history = resumed.train()
    assert [m["step"] for m in history] == [2, 3, 4, 5]
    assert history == [m for m in uninterrupted.history if m["step"] > 1]
    expected = trained_weights(uninterrupted)
    assert all(torch.equal(p, expected[n]) for n, p in trained_weights(resumed).items())


def test_a_pair_sampler_state_of_another_dataset_size_is_refused():
    sampler = IndexSampler(3, seed=0)
    sampler.draw(2)
    with pytest.raises(ValueError, match="does not fit this sampler of 1 indices"):
        IndexSampler(1, seed=0).load_state_dict(sampler.state_dict())
    resumed = IndexSampler(3, seed=5)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.draw(4) == sampler.draw(4)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "qwen-image"])
def test_one_dpo_step_on_every_family_changes_the_lora_and_the_saved_lora_changes_the_pipeline(tmp_path, family):
    config = dpo_config(tmp_path, pretrained_model_name_or_path=f"tiny:{family}", max_steps=1, learning_rate=1e-2)
    trainer = DPOTrainer(tiny_pipeline(family), config, pairs=red_over_blue_pairs(4))
    before = trained_weights(trainer)
    history = trainer.train()
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # model = reference at the start
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())
    fresh = tiny_pipeline(family)
    kw = dict(trainer.generation_kwargs(2, 1.0), output_type="pt")
    base = fresh(["a red square"], generator=torch.Generator().manual_seed(0), **kw).images
    fresh.load_lora_weights(tmp_path / "run" / "final")
    tuned = fresh(["a red square"], generator=torch.Generator().manual_seed(0), **kw).images
    assert tuned.shape == base.shape and (tuned - base).abs().max() > 1e-6


def test_one_dpo_step_on_wan_video_pairs_changes_the_lora_and_the_saved_lora_changes_the_pipeline(tmp_path):
    red, blue = red_blue_images(2)
    frames = torch.linspace(0.5, 1.0, 9).view(1, 9, 1, 1, 1)  # 9 frames (the VAE's 4x time compression + 1)
    pairs = PreferencePairs.from_tensors(["a red square"] * 2, red[:, None] * frames, blue[:, None] * frames)
    config = dpo_config(
        tmp_path, pretrained_model_name_or_path="tiny:wan", height=16, width=16, max_steps=1, learning_rate=1e-2
    )
    trainer = DPOTrainer(tiny_pipeline("wan"), config, pairs=pairs)
    assert trainer.pairs[0].image_0.shape == (9, 3, 16, 16)  # every frame resized to the training size
    before = trained_weights(trainer)
    history = trainer.train()
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())
    fresh = tiny_pipeline("wan")
    kw = dict(trainer.generation_kwargs(2, 1.0), num_frames=9, output_type="pt")
    base = fresh(["a red square"], generator=torch.Generator().manual_seed(0), **kw).frames
    fresh.load_lora_weights(tmp_path / "run" / "final")
    tuned = fresh(["a red square"], generator=torch.Generator().manual_seed(0), **kw).frames
    assert tuned.shape == base.shape == (1, 9, 3, 16, 16) and (tuned - base).abs().max() > 1e-6


def test_bad_dpo_setups_raise(tmp_path):
    with pytest.raises(ValueError, match="strict preferences"):
        from visalign.pipelines.preference_data import PreferencePairs

        ties = PreferencePairs.from_tensors(["c"], torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), [0.5])
        DPOTrainer(tiny_pipeline("sd"), dpo_config(tmp_path), pairs=ties)
    with pytest.raises(ValueError, match="pass `pairs`"):
        DPOTrainer(
            tiny_pipeline("sd"), dpo_config(tmp_path), pairs=red_over_blue_pairs(2), reward=Redness(), prompts=["a"]
        )
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` must be > 0"):
        dpo_config(tmp_path, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="`caption_dropout` must be in"):
        dpo_config(tmp_path, caption_dropout=1.0)


def test_a_dpo_config_reads_only_its_split_of_a_sharded_dataset(tmp_path):
    root = hub_snapshot(tmp_path / "pickapic")  # data/{split}-NNNNN-of-MMMMM-*.parquet, a tie ending each shard
    config = dpo_config(tmp_path / "validation", dataset=str(root), split="validation")
    validation = DPOTrainer.from_config(config)
    assert validation.pairs.captions == ["validation 0 0", "validation 0 1"]  # not validation_unique's, not train's
    assert validation.pairs[0].image_0.shape == (3, 32, 32)
    train = DPOTrainer.from_config(dpo_config(tmp_path / "train", dataset=str(root)))  # the default split
    assert train.pairs.captions == ["train 0 0", "train 0 1", "train 1 0", "train 1 1"]
    with pytest.raises(ValueError, match="no shard of split 'valid'"):
        DPOTrainer.from_config(dpo_config(tmp_path / "valid", dataset=str(root), split="valid"))


def test_visalign_train_diffusion_dpo_runs_a_config_file(tmp_path):
    data = save_pairs(red_over_blue_pairs(4), tmp_path / "pairs")
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "diffusion-dpo",
            "--config",
            str(ROOT / "configs" / "tiny_dpo.yaml"),
            "--set",
            f"output_dir={out}",
            f"dataset={data}",
        ]
    )
    assert code == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists() and (out / "metrics.jsonl").exists()
    config = str(ROOT / "configs" / "tiny_dpo.yaml")
    with pytest.raises(ValueError, match="unknown DPOConfig key"):  # --debug: the exception itself
        main(["train", "diffusion-dpo", "--config", config, "--set", "nope=1", "--debug"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*dpo*.yaml")))
def test_shipped_dpo_configs_load(name):
    from visalign.config import load_config

    config = load_config(DPOConfig, ROOT / "configs" / name)
    assert config.beta > 0
