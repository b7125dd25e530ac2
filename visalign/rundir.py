"""A run directory belongs to one run: what marks a folder as a run's, who may start there, and its checkpoints.

    start = claim_output_dir(config)   # "fresh" | "resume" | "restart" | "overwrite", or FileExistsError

A folder is a run's when it holds any of `RUN_FILES` (the engine writes `config.yaml` and `run.json` first). A new
run into it is refused, since it would overwrite `final/`, append to `metrics.jsonl` and leave the old run's
checkpoints beside the new ones (where `resume_from=latest` would pick the wrong run). `truncate_metrics` cuts
`metrics.jsonl` back to a checkpoint on resume, so a resumed run logs each step once. The checkpoint folders are
listed, chosen for `resume_from`, pruned and rewound here; what one holds is `visalign.checkpointing`'s.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from visalign.config import TrainConfig, config_to_dict
from visalign.files import read_text

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", CHECKPOINTS, "final")


def claim_output_dir(config: TrainConfig) -> str:
    """How a run may start in `config.output_dir`: `"fresh"`, `"resume"`, `"restart"` or `"overwrite"`; else raise.

    A folder is a run's when it holds any of `RUN_FILES`. Into such a folder a run may only resume (`resume_from`
    `"latest"` with a checkpoint there, or one of its own checkpoints), restart the same unfinished run that was
    killed before its first checkpoint (`resume_from="latest"`, same config), or clear it first
    (`overwrite_output_dir=true`). Anything else would mix two runs' checkpoints, metrics and final weights, so it
    is refused with a `FileExistsError` saying what to do. Reads only: the caller acts on the answer.
    """
    out = Path(config.output_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return "fresh"
    if config.overwrite_output_dir:
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise ValueError(f"`overwrite_output_dir`: refusing to clear {out}, which holds the working directory")
        return "overwrite"
    run = out / "run.json"
    try:
        finished = (out / "final").exists() or json.loads(run.read_text()).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        finished = False
    what = f"{'a finished' if finished else 'an unfinished'} run ({', '.join(found)})"
    fix = "resume it with resume_from=latest, choose another output_dir, or pass overwrite_output_dir=true to clear it"
    if config.resume_from == "latest":
        if latest_checkpoint(out) is not None:
            return "resume"
        current = _run_identity(yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False)))
        try:
            same = _run_identity(yaml.safe_load(read_text(out / "config.yaml"))) == current
        except (OSError, ValueError, yaml.YAMLError):  # absent or unreadable: not provably the same run
            same = False
        if not finished and same:
            return "restart"
        raise FileExistsError(
            f"output_dir {out} holds {what} with no checkpoint to resume, "
            f"{'made with another config' if not same else 'already complete'}: "
            "choose another output_dir or pass overwrite_output_dir=true to clear it"
        )
    if config.resume_from is not None:
        folder = Path(config.resume_from).resolve()
        if folder.parent == (out / CHECKPOINTS).resolve():
            return "resume"
        raise FileExistsError(
            f"output_dir {out} holds {what}, and resume_from {config.resume_from} is not one of its checkpoints: "
            "resume into an empty output_dir, or pass overwrite_output_dir=true to clear it"
        )
    raise FileExistsError(f"output_dir {out} holds {what}: {fix}")


def _run_identity(values: Any) -> Any:
    """A saved config without the fields that say how to start a run rather than what the run is."""
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if k not in ("resume_from", "overwrite_output_dir")}


def _metric_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume_from` names: `"latest"` is the newest under `output_dir` (None when there is
    none: the run starts fresh), None is a fresh start, anything else is the folder it names."""
    if config.resume_from is None:
        return None
    if config.resume_from == "latest":
        folder = latest_checkpoint(config.output_dir)
        if folder is None:
            logger.info("resume_from='latest': no checkpoint under %s, starting fresh", config.output_dir)
        return folder
    return Path(config.resume_from)


def remove_checkpoints_after(output_dir: str | Path, step: int) -> None:
    """Rewind a run resumed at `step`: its later checkpoints belong to the future being rewritten, and would make
    `resume_from="latest"` mix it with the new one."""
    later = [c for c in checkpoints(output_dir) if int(c.name.split("-")[-1]) > step]
    if later:
        logger.warning("resumed at step %d: removing the later checkpoints %s", step, [c.name for c in later])
    for old in later:
        shutil.rmtree(old)


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> None:
    """Keep the newest `limit` checkpoints under `output_dir` (all of them when `limit` is None)."""
    if limit is None:
        return
    for old in checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old)


def count_rows(path: Path) -> int:
    """Lines in a JSONL file (0 when it does not exist)."""
    return len(read_text(path).splitlines()) if path.is_file() else 0


def truncate_metrics(path: Path, rows: int | None, step: int) -> None:
    """Keep the first `rows` lines of the metrics file `path` (when `rows` is None, for a checkpoint that did not
    count them: the leading rows up to `step`), written to a temporary name and renamed."""
    if not path.is_file():
        return
    lines = read_text(path).splitlines()
    if rows is None:
        rows = sum(1 for _ in itertools.takewhile(lambda line: _metric_step(line) <= step, lines))
    if rows < len(lines):
        logger.info("resume: dropping %d rows of %s logged after the checkpoint", len(lines) - rows, path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines[:rows]), encoding="utf-8")
    os.replace(tmp, path)
