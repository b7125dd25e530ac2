"""Verifiable-reward throughput: images/s of the GenEval detector, its CLIP color step, and the OCR reward.

The models are the tiny random ones the tests build, saved in their official layouts and loaded through the real
loaders (`GenEvalDetector.from_pretrained`, `load_reward("ocr", ...)`): a Swin/Mask2Former with 12 queries and a
32-wide CLIP, a one-layer ViT/TrOCR. The numbers therefore measure the pipeline around the networks (GenEval's
resize to 800 x 800, mask upsampling and post-processing, crops, PIL conversion, greedy decoding), not the
throughput of the real checkpoints. Inputs: `--batch-size` images of `--image-size` squared.

- `detector`: `GenEvalDetector.detect_batch` (Mask2Former forward + mmdetection-style post-processing), with
  `min_score=0` so that all 100 (query, class) pairs are post-processed (a random model has no confident ones).
- `colors`: `GenEvalDetector.classify_colors_many`, one masked crop per image (the box of the top detection).
- `ocr-got`, `ocr-trocr`: `OCRReward.score` with GOT-OCR 2.0 (the default engine class; 256 image tokens) or
  TrOCR, `max_new_tokens` 16, prompts quoting a 20-character target.

One fresh process per config (`harness.run_each`); times are medians of `--repeats` runs after a warm-up, wall time
and the process's CPU time (the steadier measure on a shared machine).

    python benchmarks/perf/verifiable.py          # writes benchmarks/results/verifiable_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import rss_mb, run_each, write_record

CONFIGS = ("detector", "colors", "ocr-got", "ocr-trocr")
RESULT = Path(__file__).resolve().parents[1] / "results" / "verifiable_throughput.json"
TESTS = Path(__file__).resolve().parents[2] / "tests"  # the tiny official-layout builders live with the tests


def run_one(name: str, batch_size: int, image_size: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(TESTS))
    torch.manual_seed(0)
    pixels = torch.rand(batch_size, 3, image_size, image_size)
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("ocr"):
            from test_reward_ocr import save_got_ocr2, save_trocr

            from visalign.rewards import load_reward

            save = save_got_ocr2 if name == "ocr-got" else save_trocr
            reward = load_reward("ocr", str(save(Path(tmp) / name)), max_new_tokens=16)
            prompts = ['a poster that reads "Spring Collection 24"'] * batch_size
            run = lambda: reward.score(pixels, prompts)  # noqa: E731
        else:
            from reward_helpers import save_clip_folder
            from test_reward_geneval import save_mask2former

            from visalign.reward_models.geneval import Detection, GenEvalDetector

            detector = GenEvalDetector.from_pretrained(
                str(save_mask2former(Path(tmp) / "m2f")), color_model=str(save_clip_folder(Path(tmp) / "clip"))
            )
            detector.min_score = 0.0  # every (query, class) pair post-processed: the worst case
            if name == "detector":
                run = lambda: detector.detect_batch(pixels)  # noqa: E731
            else:
                tops = [dets[0] for dets in detector.detect_batch(pixels)]
                objects = [Detection(d.label, d.score, d.box, None, d.mask) for d in tops]
                requests = [(p, [d], d.label) for p, d in zip(pixels, objects)]
                run = lambda: detector.classify_colors_many(requests)  # noqa: E731
        rss_before = rss_mb()
        with torch.no_grad():
            run()  # warm-up
            times, cpu = [], []
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    seconds = statistics.median(times)
    return {
        "batch_size": batch_size,
        "image_size": image_size,
        "seconds_per_batch": seconds,
        "images_per_second": batch_size / seconds,
        "cpu_seconds_per_batch": statistics.median(cpu),
        "images_per_cpu_second": batch_size / statistics.median(cpu),
        "repeats": repeats,
        "rss_mb": rss_mb(),
        "rss_before_mb": rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONFIGS, default=None, help="run one config in this process")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    if args.only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.only, args.batch_size, args.image_size, args.repeats)))
        return
    flags = [
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--repeats",
        str(args.repeats),
    ]
    results = run_each(__file__, list(CONFIGS), flags, args.threads)
    for name, r in results.items():
        print(f"{name}: {r['images_per_second']:.2f} images/s, {r['images_per_cpu_second']:.2f} per CPU second")
    write_record(args.out, __file__, args.threads, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
