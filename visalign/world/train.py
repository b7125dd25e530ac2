"""`visalign world train-base`: train the world's models from scratch on rendered scenes (seeded, CPU-friendly).

Stages, each writing a folder under `out`, each later stage reading the earlier ones:

1. `vae`  - `AutoencoderKL` 32x32x3 <-> 16x16x4, MSE + a small KL; `scaling_factor` set so latents have unit std.
2. `clip` - `CLIPModel` trained contrastively (its own loss) on world captions and renders; also the world-clip reward.
3. `sd`   - `UNet2DConditionModel`, epsilon prediction on VAE latents, DDPM schedule (scaled-linear betas), frozen
            CLIP text tower, 10% caption dropout for classifier-free guidance -> a `StableDiffusionPipeline`.
4. `sd3`  - `SD3Transformer2DModel`, rectified-flow velocity (noise - x0) with logit-normal sigmas, the same text
            tower as both SD3 CLIP encoders and no T5 -> a `StableDiffusion3Pipeline`.

Only train-split prompts are rendered; the held-out set comes from the test split. Generators keep an EMA of their
weights, which is what is saved. Every stage records its wall and CPU time and its run record
(`visalign.files.run_record`) in `training_record.json`; a generator also in its `visalign_world.json`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, SD3Transformer2DModel
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTokenizer

from visalign.config import check_finite
from visalign.engine import EMA
from visalign.files import run_record
from visalign.world.evaluate import accuracy, generate, heldout_prompts
from visalign.world.models import (
    MAX_SEQUENCE_LENGTH,
    assemble,
    build_clip,
    build_transformer,
    build_unet,
    build_vae,
    world_tokenizer,
)
from visalign.world.scenes import CATEGORIES, Prompt, prompt_split, render_prompt

logger = logging.getLogger(__name__)

STAGES = ("vae", "clip", "sd", "sd3")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@dataclass
class TrainBaseConfig:
    """What `visalign world train-base` reads (`--set key=value`, parsed by `visalign.config.parse_overrides`)."""

    out: str = field(default="assets/world", metadata={"help": "Output folder: one subfolder per stage."})
    seed: int = field(default=0, metadata={"help": "Seed of the rendered data, every init and every noise draw."})
    num_images: int = field(default=20000, metadata={"help": "Rendered train-split scenes (images and captions)."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Batch of the `sd` and `sd3` generator stages (one process)."}
    )
    vae_steps: int = field(default=800, metadata={"help": "AdamW steps of the VAE stage."})
    vae_per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch of the VAE stage."})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the VAE stage."})
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the VAE's KL term beside the MSE."})
    clip_steps: int = field(default=1500, metadata={"help": "AdamW steps of the contrastive CLIP stage."})
    clip_per_device_train_batch_size: int = field(
        default=256, metadata={"help": "Batch of the CLIP stage (its negatives)."}
    )
    clip_learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak learning rate of the CLIP stage (one-cycle)."}
    )
    sd_steps: int = field(default=2400, metadata={"help": "Steps of the `sd` (UNet, epsilon) generator."})
    sd3_steps: int = field(default=2400, metadata={"help": "Steps of the `sd3` (transformer, flow) generator."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Learning rate of both generators (200 warm-up steps)."}
    )
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Share of generator captions replaced by '' (for classifier-free guidance)."}
    )
    ema_decay: float = field(default=0.998, metadata={"help": "Decay of the generators' weight EMA (what is saved)."})
    sd3_layers: int = field(default=10, metadata={"help": "Joint-attention blocks of the `sd3` transformer."})
    sd3_heads: int = field(
        default=6, metadata={"help": "Attention heads (of 16 channels) of the `sd3` transformer: width 16 x heads."}
    )
    sd3_learning_rate: float | None = field(
        default=1e-3, metadata={"help": "Peak learning rate of the `sd3` generator (None: `learning_rate`)."}
    )
    sd3_adaln_zero: bool = field(
        default=True,
        metadata={"help": "DiT's adaLN-Zero init of the `sd3` transformer: every block starts as the identity."},
    )
    sd3_lr_schedule: Literal["constant", "cosine"] = field(
        default="constant",
        metadata={"help": "`sd3` learning rate after warm-up: constant, or cosine decay to 10% at the last step."},
    )
    eval_steps: int = field(
        default=400, metadata={"help": "Generator steps between held-out verifier evaluations (and at the end)."}
    )
    eval_per_category: int = field(
        default=10, metadata={"help": "Held-out prompts per category in each generator evaluation."}
    )

    def __post_init__(self) -> None:
        check_finite(self)
        positive = ("num_images", "per_device_train_batch_size", "vae_steps", "vae_per_device_train_batch_size")
        positive += ("vae_learning_rate", "clip_steps", "clip_per_device_train_batch_size", "clip_learning_rate")
        positive += ("sd_steps", "sd3_steps", "learning_rate", "eval_steps", "eval_per_category", "sd3_layers")
        positive += ("sd3_heads",)
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}")
        if self.kl_weight < 0:
            raise ValueError(f"`kl_weight` must be >= 0, got {self.kl_weight!r}")
        for name in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}")
        if self.sd3_learning_rate is not None and not self.sd3_learning_rate > 0:
            raise ValueError(f"`sd3_learning_rate` must be > 0 or None, got {self.sd3_learning_rate!r}")


def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`n` renders of train-split prompts (categories equally likely) and their captions."""
    rng = np.random.default_rng(seed)
    train = prompt_split("train")
    images, captions = [], []
    for _ in tqdm(range(n), desc="render", leave=False):
        cat = CATEGORIES[rng.integers(len(CATEGORIES))]
        p: Prompt = train[cat][rng.integers(len(train[cat]))]
        images.append(render_prompt(p, rng))
        captions.append(p.text)
    return torch.from_numpy(np.stack(images)), captions


def _record(out: Path, stage: str, info: dict) -> None:
    path = out / "training_record.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[stage] = info
    path.write_text(json.dumps(record, indent=2))


def train_vae(cfg: TrainBaseConfig, images: torch.Tensor) -> AutoencoderKL:
    torch.manual_seed(cfg.seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    for step in bar:
        x = images[torch.randint(len(images), (cfg.vae_per_device_train_batch_size,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
    vae.register_to_config(scaling_factor=float(1 / z.std()), shift_factor=0.0)
    return vae


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """World renders in [0, 1] -> CLIP pixel values (OpenAI normalization; images are already 32x32)."""
    return (images - CLIP_MEAN.to(images)) / CLIP_STD.to(images)


def train_clip(cfg: TrainBaseConfig, images: torch.Tensor, captions: list[str], tok: CLIPTokenizer) -> CLIPModel:
    torch.manual_seed(cfg.seed)
    clip = build_clip(len(tok)).train()
    ids = tok(captions, padding="max_length", return_tensors="pt").input_ids
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_learning_rate, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.clip_learning_rate, total_steps=cfg.clip_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.clip_steps), desc="clip")
    for step in bar:
        idx = torch.randint(len(images), (cfg.clip_per_device_train_batch_size,), generator=g)
        loss = clip(input_ids=ids[idx], pixel_values=clip_pixels(images[idx]), return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval()


@torch.no_grad()
def clip_retrieval_accuracy(clip: CLIPModel, tok: CLIPTokenizer, n: int = 256, seed: int = 123) -> float:
    """Top-1 image->text accuracy among `n` held-out prompts, one render each."""
    rng = np.random.default_rng(seed)
    prompts = heldout_prompts()
    prompts = [prompts[i] for i in rng.permutation(len(prompts))[:n]]
    images = torch.from_numpy(np.stack([render_prompt(p, rng) for p in prompts]))
    ids = tok([p.text for p in prompts], padding="max_length", return_tensors="pt").input_ids
    logits = clip(input_ids=ids, pixel_values=clip_pixels(images)).logits_per_image
    return float((logits.argmax(1) == torch.arange(len(prompts))).float().mean())


def adaln_zero_(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """DiT's adaLN-Zero initialization (Peebles & Xie 2023, sec. 3.2) of an SD3 transformer, in place.

    Zeroing the linear layers that regress each block's shift, scale and gate from the timestep/pooled-text
    embedding makes every gate 0, so each block starts as the identity; the final adaptive norm and output
    projection start at zero too, so the untrained model predicts velocity 0. DiT found this init to train fastest.
    """
    layers = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


def _lr_factor(step: int, steps: int, cosine: bool, warmup: int = 200) -> float:
    """Linear warm-up over `warmup` steps, then 1 or a cosine from 1 down to 0.1 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_generator(cfg: TrainBaseConfig, family: str, images: torch.Tensor, captions: list[str], out: Path) -> dict:
    """Train the `sd` (epsilon) or `sd3` (flow) generator on VAE latents and save the pipeline under `out/family`."""
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    tok = CLIPTokenizer.from_pretrained(out / "clip")
    torch.manual_seed(cfg.seed)
    if family == "sd":
        denoiser = build_unet()
    else:
        denoiser = build_transformer(cfg.sd3_layers, cfg.sd3_heads)
        if cfg.sd3_adaln_zero:
            adaln_zero_(denoiser)
    pipe = assemble(family, clip, tok, vae, denoiser)
    pipe.set_progress_bar_config(disable=True)
    vocab = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(vocab)}
    cap_idx = torch.tensor([index[c] for c in captions])
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)])
        z = z * vae.config.scaling_factor
        if family == "sd":
            embeds = pipe.encode_prompt(vocab, "cpu", 1, False)[0]
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(
                vocab,
                None,
                None,
                device="cpu",
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    denoiser.train()
    lr = cfg.sd3_learning_rate if family == "sd3" and cfg.sd3_learning_rate is not None else cfg.learning_rate
    opt = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.01)
    steps = cfg.sd_steps if family == "sd" else cfg.sd3_steps
    cosine = family == "sd3" and cfg.sd3_lr_schedule == "cosine"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, cosine))
    ema = EMA(list(denoiser.parameters()), cfg.ema_decay, every=1)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    evals, losses = [], []
    eval_prompts = heldout_prompts(cfg.eval_per_category)
    start, cpu0 = time.time(), time.process_time()
    bar = tqdm(range(1, steps + 1), desc=family)
    for step in bar:
        idx = torch.randint(len(z), (cfg.per_device_train_batch_size,), generator=g)
        x0, c = z[idx], cap_idx[idx].clone()
        c[torch.rand(len(c), generator=g) < cfg.caption_dropout] = index[""]
        noise = torch.randn(x0.shape, generator=g)
        if family == "sd":
            t = torch.randint(0, ddpm.config.num_train_timesteps, (len(x0),), generator=g)
            pred = denoiser(ddpm.add_noise(x0, noise, t), t, embeds[c]).sample
            loss = F.mse_loss(pred, noise)
        else:
            sigma = torch.sigmoid(torch.randn(len(x0), generator=g)).view(-1, 1, 1, 1)
            xt = (1 - sigma) * x0 + sigma * noise
            pred = denoiser(
                hidden_states=xt,
                encoder_hidden_states=embeds[c],
                pooled_projections=pooled[c],
                timestep=sigma.flatten() * 1000,
            ).sample
            loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % cfg.eval_steps == 0 or step == steps:
            denoiser.eval()
            with ema.swapped_in():
                samples = generate(pipe, [p.text for p in eval_prompts], seed=10_000, progress=False)
            acc = accuracy(samples, eval_prompts)
            denoiser.train()
            evals.append({"step": step, "minutes": (time.time() - start) / 60, **acc})
            logger.info("%s step %d: held-out slice accuracy %.3f", family, step, acc["overall"])
            bar.write(f"{family} step {step}: held-out slice accuracy {acc['overall']:.3f} {acc['per_category']}")
    ema.copy_to()  # the EMA weights are what is saved
    denoiser.eval()
    folder = out / family
    pipe.save_pretrained(folder, safe_serialization=True)
    info = {
        "steps": steps,
        "wall_minutes": (time.time() - start) / 60,
        "cpu_minutes": (time.process_time() - cpu0) / 60,
        "params": sum(p.numel() for p in denoiser.parameters()),
        "final_loss": float(np.mean(losses[-100:])),
        "curve": evals,
        "run": run_record(config=cfg, seeds={"seed": cfg.seed}),
    }
    gen = {"num_inference_steps": 20, "guidance_scale": 3.0, "height": 32, "width": 32}
    if family == "sd3":
        gen["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    (folder / "visalign_world.json").write_text(json.dumps({"generation": gen, "training": info}, indent=2))
    return info


def train_base(cfg: TrainBaseConfig, stages: tuple[str, ...] = STAGES) -> dict:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"`stages` must be drawn from {STAGES}, got {sorted(unknown)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = render_dataset(cfg.num_images, cfg.seed)
    results = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        start, cpu0 = time.time(), time.process_time()
        if stage == "vae":
            vae = train_vae(cfg, images)
            vae.save_pretrained(out / "vae")
            with torch.no_grad():
                x = images[:512] * 2 - 1
                mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()
            info = {"recon_mse": mse}
        elif stage == "clip":
            tok = world_tokenizer()
            clip = train_clip(cfg, images, captions, tok)
            clip.save_pretrained(out / "clip")
            tok.save_pretrained(out / "clip")
            info = {"heldout_top1_retrieval_256": clip_retrieval_accuracy(clip, tok)}
        else:
            info = train_generator(cfg, stage, images, captions, out)
        info.setdefault("run", run_record(config=cfg, seeds={"seed": cfg.seed}))  # the one run record
        info |= {
            "stage_wall_minutes": (time.time() - start) / 60,
            "stage_cpu_minutes": (time.process_time() - cpu0) / 60,
        }
        _record(out, stage, info)
        results[stage] = info
        logger.info("stage %s: %s", stage, {k: v for k, v in info.items() if k != "curve"})
    return results
