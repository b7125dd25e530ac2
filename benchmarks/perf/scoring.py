"""Scoring benchmark: images/s and peak memory of each reward family, batched tensor path vs reference-style path.

Each family is a ViT-B-sized instance with random weights (seeded, so both paths load identical weights), built in
memory through the public constructors of `visalign.reward_models`:

- pickscore, clipscore: transformers `CLIPModel` ViT-B/16 (text 512 x 12), full CLIP BPE tokenizer.
- hpsv2: open_clip `ViT-B-16`, `SimpleTokenizer`, longest-side + pad preprocessing.
- aesthetic: transformers CLIP ViT-B/16 image tower (projection 512) + the 512-1024-128-64-16-1 head.
- imagereward: BLIP ViT-B/16 (`BlipVisionModel`) + BERT-base with cross-attention (`BlipTextModel`) + head.

Inputs: `--batch-size` images of `--image-size` squared (uint8 levels), prompts in groups of 4 samples.

- batched: `reward.score(pixels, prompts)` on the whole `[B, 3, H, W]` float tensor (torch preprocessing, one
  forward pass, each distinct prompt encoded once).
- reference: what the reference packages do (hpsv2.score, ImageReward.inference_rank): per image, tensor -> PIL,
  the reference PIL/torchvision preprocessing, then the model on that one image and its prompt.

Both run under `torch.no_grad()` in one fresh process per family, interleaved (reference, batched, reference, ...)
so that both see the same load on a shared machine; times are medians of `--repeats` runs after a warm-up. The
process's CPU time is reported next to wall time: on a shared machine it is the steadier measure (with `--threads 1`
no thread spins at a barrier). Memory is the peak resident set size sampled every 2 ms while scoring
(`scoring_rss_mb`: above the RSS before the run). Scores and aspects (CLIPScore's cosine) are compared on the same
images: `max_abs_diff` (batched vs reference, which includes the stated preprocessing tolerance) and
`max_abs_diff_same_inputs` (the batched model on the reference's preprocessed tensors vs per image).

    python benchmarks/perf/scoring.py                  # writes benchmarks/results/scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FAMILIES = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")
PROMPTS = [
    "a red fox sitting in a snowy forest at dawn, highly detailed",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a watercolor painting of a lighthouse on a cliff during a storm",
]
RESULT = Path(__file__).resolve().parents[1] / "results" / "scoring.json"


def build(family: str):
    """The reward of `family` at ViT-B size with seeded random weights, frozen, in eval mode."""
    import open_clip
    import torch
    from transformers import (
        BertTokenizer,
        BlipTextModel,
        BlipVisionConfig,
        BlipVisionModel,
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from visalign.reward_models.aesthetic import AestheticMLP, LAIONAesthetic
    from visalign.reward_models.clip import CLIPScore, PickScore
    from visalign.reward_models.hps import HPSv2
    from visalign.reward_models.imagereward import ImageReward, blip_text_config
    from visalign.testing import FULL_CLIP_MERGES, clip_tokenizer

    torch.manual_seed(0)
    vision = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072}
    vision |= {"num_hidden_layers": 12, "num_attention_heads": 12}
    if family in ("pickscore", "clipscore"):
        text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
        model = CLIPModel(CLIPConfig(text_config=text | {"eos_token_id": 2}, vision_config=vision, projection_dim=512))
        tokenizer = clip_tokenizer(FULL_CLIP_MERGES)
        reward = PickScore(model, tokenizer) if family == "pickscore" else CLIPScore(model, tokenizer)
    elif family == "hpsv2":
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16"))
        reward = HPSv2(model, open_clip.SimpleTokenizer(), version="v2.1")
    elif family == "aesthetic":
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, projection_dim=512))
        reward = LAIONAesthetic(tower, AestheticMLP(512))
    else:
        words = sorted({w.strip(",").lower() for p in PROMPTS for w in p.split()})
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / "visalign-bench-bert"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        tokenizer = BertTokenizer.from_pretrained(folder)
        med = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
        med |= {"intermediate_size": 3072, "max_position_embeddings": 512, "layer_norm_eps": 1e-12}
        med |= {"hidden_act": "gelu", "pad_token_id": 0, "add_cross_attention": True}
        blip = BlipVisionModel(BlipVisionConfig(**vision, layer_norm_eps=1e-6))
        text = BlipTextModel(blip_text_config(med, 768), add_pooling_layer=False)
        reward = ImageReward(blip, text, AestheticMLP(768), tokenizer)
    return reward.requires_grad_(False).eval()


def images(batch_size: int, size: int):
    """`[B, 3, size, size]` uint8: smooth random images (low-frequency noise, bilinearly upsampled)."""
    import torch

    g = torch.Generator().manual_seed(0)
    low = torch.rand(batch_size, 3, 9, 9, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


class PeakRSS:
    """Peak resident set size (bytes) of this process, sampled every 2 ms while in the `with` block."""

    def __enter__(self) -> PeakRSS:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def worker(family: str, batch_size: int, image_size: int, repeats: int, threads: int) -> dict[str, Any]:
    """Time both paths of one family in this fresh process, interleaved (reference, batched, reference, ...) so that
    both see the same machine load; returns per path the median time, peak memory and the last scores."""
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    reward = build(family)
    uint8 = images(batch_size, image_size)
    pixels = uint8.float() / 255
    prompts = [PROMPTS[i // 4 % len(PROMPTS)] for i in range(batch_size)]
    reference = reward.transform.reference_pipeline()

    def values(out) -> torch.Tensor:  # the score and the aspects (CLIPScore's cosine), `[B, 1 + aspects]`
        return torch.stack([out.score, *out.aspects.values()], dim=1)

    def batched(n: int) -> torch.Tensor:
        return values(reward.score(pixels[:n], prompts[:n]))

    def per_image(n: int) -> torch.Tensor:
        scores = []
        for i in range(n):
            image = Image.fromarray(uint8[i].permute(1, 2, 0).numpy())
            scores.append(values(reward.score_pixel_values(reference(image)[None], [prompts[i]])))
        return torch.cat(scores)

    paths = {"reference": per_image, "batched": batched}  # the small-memory path first: its RSS peak stays clean
    result: dict[str, Any] = {
        path: {"times": [], "cpu_times": [], "peak_rss_mb": 0.0, "scoring_rss_mb": 0.0} for path in paths
    }
    with torch.no_grad():
        for run in paths.values():
            run(2)  # warm-up
        for _ in range(repeats):
            for path, run in paths.items():
                with PeakRSS() as memory:
                    start, cpu = time.perf_counter(), time.process_time()
                    scores = run(batch_size)
                    result[path]["times"].append(time.perf_counter() - start)
                    result[path]["cpu_times"].append(time.process_time() - cpu)
                result[path]["scores"] = scores.tolist()
                result[path]["peak_rss_mb"] = max(result[path]["peak_rss_mb"], memory.peak / 2**20)
                result[path]["scoring_rss_mb"] = max(
                    result[path]["scoring_rss_mb"], (memory.peak - memory.start) / 2**20
                )
        stacked = torch.stack([reference(Image.fromarray(u.permute(1, 2, 0).numpy())) for u in uint8])
        result["batched_on_reference_inputs"] = values(reward.score_pixel_values(stacked, prompts)).tolist()
    for path in paths:
        result[path]["seconds"] = statistics.median(result[path]["times"])
        result[path]["cpu_seconds"] = statistics.median(result[path]["cpu_times"])
    result["params_m"] = sum(p.numel() for p in reward.parameters()) / 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads per process")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--worker", choices=FAMILIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.image_size, args.repeats, args.threads)))
        return 0

    import torch

    load_at_start = os.getloadavg()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    common = [f"--batch-size={args.batch_size}", f"--image-size={args.image_size}", f"--repeats={args.repeats}"]
    common += [f"--threads={args.threads}"]
    families = {}
    for family in args.families:
        command = [sys.executable, __file__, "--worker", family, *common]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        runs = json.loads(done.stdout.strip().splitlines()[-1])
        batched, reference = runs["batched"], runs["reference"]
        diff = max(abs(a - b) for x, y in zip(batched["scores"], reference["scores"]) for a, b in zip(x, y))
        same = max(
            abs(a - b) for x, y in zip(runs["batched_on_reference_inputs"], reference["scores"]) for a, b in zip(x, y)
        )
        families[family] = {
            "params_m": round(runs["params_m"], 1),
            **{
                path: {
                    "images_per_s": round(args.batch_size / r["seconds"], 2),
                    "images_per_cpu_s": round(args.batch_size / r["cpu_seconds"], 2),
                    "seconds": round(r["seconds"], 3),
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    "scoring_rss_mb": round(r["scoring_rss_mb"], 1),
                    "times": [round(t, 3) for t in r["times"]],
                }
                for path, r in (("batched", batched), ("reference", reference))
            },
            "speedup": round(reference["seconds"] / batched["seconds"], 2),
            "speedup_cpu_time": round(reference["cpu_seconds"] / batched["cpu_seconds"], 2),
            "max_abs_diff": diff,
            "max_abs_diff_same_inputs": same,
            "score_range": [min(v[0] for v in batched["scores"]), max(v[0] for v in batched["scores"])],
        }
        print(f"{family:12s} {json.dumps(families[family])}", flush=True)
    report = {
        "command": shlex.join(["python", "benchmarks/perf/scoring.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "load_average_1_5_15min": {"start": load_at_start, "end": os.getloadavg()},
            "torch": torch.__version__,
        },
        "config": {"batch_size": args.batch_size, "image_size": args.image_size, "repeats": args.repeats},
        "families": families,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
