"""The CFG gradient of the GRPO update: Flow-GRPO detaches the unconditional branch when it recomputes log-probs
(`noise_pred_uncond.detach()` in `scripts/train_sd3.py: compute_log_prob`); `cfg_backprop_uncond=True` does not.

The trainer's LoRA gradient is compared with an independent float64 computation: a float64 copy of the LoRA-wrapped
transformer run once per branch (not in one doubled batch), the reference's `sde_step_with_logprob` log-density
written out here, and the clipped surrogate at ratio 1 (on-policy), i.e. `-mean(A * exp(log_prob - old))`.
"""

import copy
import math

import pytest
import torch
from preference_helpers import Brightness
from test_grpo_trainer import grpo_config

from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer, PrefGRPOConfig
from visalign.pipelines.tempflow import TempFlowGRPOConfig
from visalign.testing import tiny_pipeline

PROMPTS = ["a red square", "two blue circles"]
GUIDANCE = 4.5
STEP = 1


def make_trainer(tmp_path, **kw):
    config = grpo_config(
        tmp_path,
        guidance_scale=GUIDANCE,
        group_size=2,
        sample_batch_size=4,
        per_device_train_batch_size=4,
        noise_level=0.7,
        **kw,
    )
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    generator = torch.Generator().manual_seed(1)
    for name, p in trainer.engine.named_parameters:  # B starts at 0: make both LoRA factors carry gradient
        if "lora_B" in name:
            p.data.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return trainer


def reference_gradient(trainer, rollout, rows, advantages, *, detach_uncond):
    """The LoRA gradient of Flow-GRPO's loss for `rows` at `STEP`, in float64, computed without our sampler."""
    model = copy.deepcopy(trainer.engine.unwrapped).double()
    cond = rollout.conditioning.select(rows)
    x = rollout.latents[rows, STEP].double()
    timestep = rollout.timesteps[STEP].expand(len(rows)).double()

    def predict(embeds, pooled):
        out = model(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds.double(),
            pooled_projections=pooled.double(),
            return_dict=False,
        )
        return out[0]

    uncond = predict(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds)
    text = predict(cond.prompt_embeds, cond.pooled_prompt_embeds)
    if detach_uncond:
        uncond = uncond.detach()
    v = uncond + GUIDANCE * (text - uncond)
    # flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: sde_step_with_logprob
    sigmas = rollout.sigmas.double()
    sigma, sigma_prev = sigmas[STEP], sigmas[STEP + 1]
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))) * rollout.noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    prev = rollout.latents[rows, STEP + 1].double()
    step_std = std_dev_t * torch.sqrt(-dt)
    log_prob = -((prev - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - math.log(math.sqrt(2 * math.pi))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    old = rollout.log_probs[rows, STEP].double()
    loss = -(advantages.double() * torch.exp(log_prob - old)).mean()  # the clipped surrogate inside the clip range
    params = dict(model.named_parameters())
    names = [n for n, _ in trainer.engine.named_parameters]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, grads))


def trainer_gradient(trainer, rollout, rows, advantages):
    for p in trainer.engine.parameters:
        p.grad = None
    loss, stats = trainer.loss(rollout, rows, STEP, advantages, 1.0)
    assert float(stats["clipfrac"]) == 0.0  # on-policy: the surrogate's gradient is the unclipped one
    loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in trainer.engine.named_parameters}


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    detached = make_trainer(tmp / "a")
    full = make_trainer(tmp / "b", cfg_backprop_uncond=True)
    prompts = [p for p in PROMPTS for _ in range(2)]
    rollout = detached.sample_batch(prompts, torch.arange(4), 0, 0)
    return detached, full, rollout


def test_the_update_detaches_the_unconditional_branch_as_flow_grpo(setup):
    trainer, _, rollout = setup
    assert trainer.config.cfg_backprop_uncond is False
    rows, advantages = torch.arange(4), torch.tensor([1.0, -0.5, 0.25, -0.75])
    ours = flat(trainer_gradient(trainer, rollout, rows, advantages))
    reference = flat(reference_gradient(trainer, rollout, rows, advantages, detach_uncond=True))
    assert reference.norm() > 0
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


def test_backprop_through_both_branches_is_an_option_and_changes_the_gradient(setup):
    detached, full, rollout = setup
    rows, advantages = torch.arange(4), torch.tensor([1.0, -0.5, 0.25, -0.75])
    for (_, a), (_, b) in zip(detached.engine.named_parameters, full.engine.named_parameters):
        assert torch.equal(a, b)  # the same weights: only the gradient convention differs
    ours = flat(trainer_gradient(full, rollout, rows, advantages))
    both = flat(reference_gradient(full, rollout, rows, advantages, detach_uncond=False))
    assert float((ours - both).norm() / both.norm()) < 1e-4
    reference = flat(reference_gradient(detached, rollout, rows, advantages, detach_uncond=True))
    assert float((both - reference).norm() / reference.norm()) > 0.05  # the two conventions really differ
    # the forward values do not depend on the option
    out_a = detached.adapter.log_prob(rollout, rows, STEP, detach_uncond=True).log_prob
    out_b = detached.adapter.log_prob(rollout, rows, STEP, detach_uncond=False).log_prob
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


def test_every_grpo_config_detaches_by_default():
    for cls in (FlowGRPOConfig, PrefGRPOConfig, TempFlowGRPOConfig):
        assert cls().cfg_backprop_uncond is False
    assert "Flow-GRPO" in FlowGRPOConfig.__dataclass_fields__["cfg_backprop_uncond"].metadata["help"]
