"""`visalign score`: score image files with one or more rewards; prints a table and writes JSON or CSV.

    visalign score --reward pickscore=0.5 --reward hpsv2.1 --images outputs/ --prompts prompts.txt \\
        --output scores.json --output scores.csv

Images are a folder (its image files sorted by name) or a list of files; `--prompts` is a UTF-8 text file with one
prompt per image, in the same order. An image that cannot be read (truncated, damaged) gets a row with the error and
no score, and the others are scored (`--errors abort` stops instead). Several rewards are combined by
`CompositeReward` (`--mode`); with `weighted_advantage` the per-prompt normalization runs over all images of a
prompt, not batch by batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="a registered reward (see visalign.list_rewards()), optionally weighted; repeat for several",
    )
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE", help="a folder or image files")
    parser.add_argument("--prompts", required=True, help="text file with one prompt per image, in image order")
    parser.add_argument(
        "--pretrained",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights of reward NAME (hub id or path)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="a loading option of reward NAME; VALUE is read as JSON when it parses, else as a string",
    )
    parser.add_argument("--mode", choices=("weighted_raw", "weighted_advantage"), default="weighted_raw")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="backbone precision (heads stay float32)")
    parser.add_argument(
        "--output", action="append", default=[], metavar="PATH", help="write .json or .csv; repeatable"
    )
    parser.add_argument(
        "--errors",
        choices=("report", "abort"),
        default="report",
        help="an image that cannot be read: report it (a row naming the file, no score) or abort the run",
    )


def parse_rewards(specs: list[str]) -> dict[str, float]:
    """`["pickscore=0.5", "hpsv2.1"]` -> `{"pickscore": 0.5, "hpsv2.1": 1.0}`."""
    rewards: dict[str, float] = {}
    for spec in specs:
        name, _, weight = spec.partition("=")
        if name in rewards:
            raise ValueError(f"--reward {name!r} is given twice")
        try:
            rewards[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward {spec!r}: the weight must be a number") from None
    return rewards


def parse_options(pretrained: list[str], options: list[str], names: set[str]) -> dict[str, dict[str, Any]]:
    """Per reward: `{"pretrained": ..., key: value}` from `NAME=PATH` and `NAME.KEY=VALUE` arguments."""
    parsed: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in pretrained:
        name, sep, path = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--pretrained {item!r} must be NAME=PATH with NAME one of the --reward names")
        parsed[name]["pretrained"] = path
    for item in options:
        target, sep, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or name not in names:
            raise ValueError(f"--option {item!r} must be NAME.KEY=VALUE with NAME one of the --reward names")
        try:
            parsed[name][key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name][key] = value
    return parsed


def image_files(items: list[str]) -> list[Path]:
    """Image files from folders (sorted by name) and file paths, in argument order."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--images {item!r} is neither a folder nor a file")
    if not files:
        raise ValueError(f"--images {items} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_prompts(path: str, count: int) -> list[str]:
    from visalign.files import read_text

    lines = read_text(path, "--prompts file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != count:
        raise ValueError(f"--prompts {path} has {len(lines)} prompts for {count} images (one per line expected)")
    return lines


def load_pixels(path: Path):
    """`[3, H, W]` float in [0, 1]; `visalign.files.BadFileError` naming the file when it cannot be decoded."""
    from visalign.files import load_image

    return load_image(path)


def print_table(
    files: list[Path], prompts: list[str], columns: dict[str, list[float]], errors: dict[int, str]
) -> None:
    width = max(len(f.name) for f in files)
    print(f"{'image':<{width}}  " + "  ".join(f"{c:>12}" for c in columns) + "  prompt")
    for i, f in enumerate(files):
        prompt = prompts[i] if len(prompts[i]) <= 50 else prompts[i][:47] + "..."
        cells = "  ".join(f"{'error':>12}" if i in errors else f"{v[i]:>12.4f}" for v in columns.values())
        print(f"{f.name:<{width}}  {cells}  {prompt}")


def write_outputs(outputs: list[str], report: dict[str, Any], columns: dict[str, list[float]]) -> None:
    for output in outputs:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(report, indent=2) + "\n")
        else:
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "prompt", *columns, "error"])
                for i, row in enumerate(report["results"]):
                    cells = ("" if row.get("error") else f"{v[i]:.6g}" for v in columns.values())
                    writer.writerow([row["image"], row["prompt"], *cells, row.get("error", "")])


def run(args: argparse.Namespace) -> int:
    try:
        rewards = parse_rewards(args.reward)
        options = parse_options(args.pretrained, args.option, set(rewards))
        files = image_files(args.images)
        prompts = read_prompts(args.prompts, len(files))
        bad = [o for o in args.output if Path(o).suffix not in (".json", ".csv")]
        if bad:
            raise ValueError(f"--output {bad[0]!r} must end in .json or .csv")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    except (ValueError, FileNotFoundError) as e:
        print(f"visalign score: {e}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from visalign.files import BadFileError
    from visalign.reward_models.compose import CompositeReward, RewardPart
    from visalign.rewards import load_reward

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    parts = [
        RewardPart(load_reward(name, device=args.device, dtype=dtype, **options[name]), weight, name=name)
        for name, weight in rewards.items()
    ]
    composite = CompositeReward(parts, mode=args.mode)
    scores: dict[str, list[tuple[int, float]]] = {name: [] for name in rewards}  # (image index, raw score)
    errors: dict[int, str] = {}  # image index -> why it could not be read
    with torch.no_grad(), tqdm(total=len(files), unit="img", desc="scoring", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = []
            for k, f in enumerate(files[start : start + args.batch_size]):
                try:
                    batch.append(load_pixels(f))
                except BadFileError as e:
                    if args.errors == "abort":
                        print(f"visalign score: {e}", file=sys.stderr)
                        return 2
                    print(f"visalign score: {e}; reported as an error row", file=sys.stderr)
                    errors[start + k] = str(e)
                    batch.append(None)
            sizes = {tuple(p.shape) for p in batch if p is not None}
            for size in sizes:  # images of one size are scored together
                index = [i for i, p in enumerate(batch) if p is not None and tuple(p.shape) == size]
                out = composite(torch.stack([batch[i] for i in index]), [prompts[start + i] for i in index])
                for name in rewards:
                    scores[name] += [(start + i, s) for i, s in zip(index, out.aspects[name].cpu().tolist())]
            bar.update(len(batch))
    read = [i for i in range(len(files)) if i not in errors]  # the images scored, in order
    columns = {name: [math.nan] * len(files) for name in rewards}
    for name, pairs in scores.items():
        for i, s in pairs:
            columns[name][i] = s
    if len(rewards) > 1:
        columns["total"] = [math.nan] * len(files)
        if read:
            parts_ = {k: torch.tensor([v[i] for i in read]) for k, v in columns.items() if k != "total"}
            for i, t in zip(read, composite.combine(parts_, [prompts[i] for i in read]).tolist()):
                columns["total"][i] = t
    print_table(files, prompts, columns, errors)
    if errors:
        print(f"visalign score: {len(errors)} of {len(files)} images could not be read (see above)", file=sys.stderr)
    report = {
        "mode": args.mode,
        "rewards": [{"name": n, "weight": w, **options[n]} for n, w in rewards.items()],
        "results": [
            {"image": str(f), "prompt": p, **{c: None if i in errors else v[i] for c, v in columns.items()}}
            | ({"error": errors[i]} if i in errors else {})
            for i, (f, p) in enumerate(zip(files, prompts))
        ],
    }
    write_outputs(args.output, report, columns)
    return 0
