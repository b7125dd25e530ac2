"""Cost of the pairwise path: judge calls per prompt and wall time per group.

For groups of G = 8 and 16 images and three schedules (all pairs in one order, all pairs in both orders, k sampled
opponents), it measures:

- `calls`: judge calls per prompt, as the judge counts them;
- `vlm_s`: wall time per group of `UnifiedRewardPairwise` on a tiny random Qwen2.5-VL (verdict from token
  probabilities, `--batch-size` pairs per forward pass) on this machine: the cost of our batching and
  preprocessing around the model, not of a 7B judge;
- `http_s`: wall time per group of `HTTPPairwiseJudge` against a local fake OpenAI-compatible server that answers
  each request after `--latency` seconds (a stand-in for a served judge), `--workers` requests in flight;
- for a pointwise reward used pairwise (`BradleyTerryWinRate` over `world-defects`): images scored per group (one
  forward pass per image) against the images `compare` would score when called once per pair.

Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/perf/pairwise.py --out benchmarks/results/pairwise.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock


def median_seconds(fn: Callable[..., Any], repeats: int, *inputs: Any) -> float:
    """Median wall time of `fn(*inputs)` over `repeats` runs, after one warm-up run, rounded to 0.1 ms."""
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 16], help="group sizes G")
    parser.add_argument("--opponents", type=int, default=4, help="k of the sampled-opponents schedule")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass of the VLM judge")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the fake server takes per answer")
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests of the HTTP judge")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from visalign.reward_models.pairwise import PAIR_PROMPT, BradleyTerryWinRate, HTTPPairwiseJudge
    from visalign.reward_models.pairwise_vlm import UnifiedRewardPairwise
    from visalign.testing_vlm import FakeChatServer, save_tiny_qwen_vl
    from visalign.world.rewards import WorldDefectsReward

    schedules = {
        "all_pairs": {},
        "both_orders": {"both_orders": True},
        f"k{args.opponents}": {"opponents": args.opponents},
    }
    generator = torch.Generator().manual_seed(0)
    prompt = "a red square"
    rows, pointwise = [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeChatServer(lambda n, body: (200, "Image 1 is better.", args.latency)) as server,
    ):
        folder = save_tiny_qwen_vl(Path(tmp) / "judge", "qwen2_5_vl", corpus=[PAIR_PROMPT])
        for g in args.groups:
            pixels = torch.rand(g, 3, 32, 32, generator=generator)
            for schedule, options in schedules.items():
                vlm = UnifiedRewardPairwise.from_pretrained(str(folder), batch_size=args.batch_size, **options)
                http = HTTPPairwiseJudge(server.url, max_workers=args.workers, **options)
                calls = vlm.group(pixels, prompt).extras["calls"]
                sent = len(server.requests)
                http_calls = http.group(pixels, prompt).extras["calls"]
                assert http_calls == calls == len(server.requests) - sent
                rows.append(
                    {
                        "G": g,
                        "schedule": schedule,
                        "calls": calls,
                        "vlm_s": median_seconds(vlm.group, args.repeats, pixels, prompt),
                        "http_s": median_seconds(http.group, args.repeats, pixels, prompt),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            reward = WorldDefectsReward()
            judge = BradleyTerryWinRate(reward)
            with mock.patch.object(reward, "_score", wraps=reward._score) as scored:
                judge.group(pixels, prompt)
                group_calls = scored.call_count
                group_images = sum(call.args[0].shape[0] for call in scored.call_args_list)
                scored.reset_mock()
                for a, b in torch.combinations(torch.arange(g), 2).tolist():
                    reward.compare(pixels[a : a + 1], pixels[b : b + 1], [prompt])
                per_pair_images = sum(call.args[0].shape[0] for call in scored.call_args_list)
            pointwise.append(
                {
                    "G": g,
                    "group_score_calls": group_calls,
                    "group_images_scored": group_images,
                    "per_pair_compare_images_scored": per_pair_images,
                    "group_s": median_seconds(judge.group, args.repeats, pixels, prompt),
                }
            )
            print(json.dumps(pointwise[-1]), flush=True)

    result = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "judge": "UnifiedRewardPairwise on a tiny random Qwen2.5-VL (32x32 images, 16 visual tokens each), probs mode",
        "pairwise": rows,
        "pointwise_used_pairwise": pointwise,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
