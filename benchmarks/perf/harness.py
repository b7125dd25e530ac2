"""What the step benchmarks share: resident memory, one fresh process per config, and the result record."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """This process's resident set now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_each(
    script: str, names: list[str], flags: list[str], threads: int, *, python: str | None = None, cwd: str | None = None
) -> dict[str, dict[str, Any]]:
    """Run `script --only NAME *flags --threads T` in a fresh process per name (so peak memory is the config's own)
    and parse the JSON its last output line holds. `python` and `cwd` run another checkout's copy (a baseline)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    results = {}
    for name in names:
        command = [python or sys.executable, script, "--only", name, *flags, "--threads", str(threads)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=cwd).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def write_record(out: str | Path, script: str, threads: int, results: dict[str, Any]) -> None:
    """Write `results` with the command that produced them and the machine they ran on."""
    record = {
        "command": f"python benchmarks/perf/{Path(script).name} " + shlex.join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
