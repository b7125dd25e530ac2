"""The run loop every trainer shares, written once: resume, evaluate, train, checkpoint, export.

    class MyTrainer(TrainingLoop):
        def train_step(self) -> dict[str, float]: ...   # one or more optimizer steps through self.engine
        def evaluate(self) -> dict[str, float]: ...     # `eval/...` metrics
        def state_dict(self) -> dict: ...                # what resuming needs besides the engine's state
        def load_state_dict(self, state: dict) -> None: ...

    history = MyTrainer(...).train()

The schedule, in optimizer steps (`TrainConfig.max_steps`, `eval_steps`, `save_steps`): resume from `resume_from`
(the engine restores weights, optimizer, RNG states and the step; the trainer its own state); evaluate at step 0 of a
fresh run; then call `train_step` until `max_steps`, evaluating whenever the step count passes a multiple of
`eval_steps` (a GRPO iteration takes several steps at once, so "passes", not "equals") and checkpointing whenever it
passes a multiple of `save_steps`; evaluate once more at the end, write the last checkpoint, let the trainer export
what it owns (`export`), and write the final weights (`Engine.finish`). `run.json`'s `status` reads `running`, then
`finished`, or `stopped` (Ctrl-C, or SIGTERM under `visalign train`) / `failed` with the step and the error. Each
evaluation row also records the CPU and wall minutes spent in `train_step` so far (`time/train_cpu_minutes`,
`time/train_wall_minutes`; kept across resumes): held-out accuracy against training cost, without the evaluations'
own time. Metrics go through `Engine.log` (tracker, `metrics.jsonl`, `Engine.history`); the progress bar and the
non-finite checks are the engine's (`Engine.optimizer_step`).
"""

from __future__ import annotations

import time
from typing import Any

from visalign.config import TrainConfig
from visalign.engine import Engine

_SPENT = "train_seconds"  # the loop's own entry in a checkpoint's trainer state


class TrainingLoop:
    """The loop of `train()`; subclasses set `self.engine` and `self.config` and supply the methods below."""

    engine: Engine
    config: TrainConfig

    def train(self) -> list[dict[str, float]]:
        """Train to `max_steps` (resuming first when `resume_from` says so); returns the logged metrics."""
        engine, config = self.engine, self.config
        state = engine.resume()
        spent = {"cpu": 0.0, "wall": 0.0} if state is None else state.pop(_SPENT, {"cpu": 0.0, "wall": 0.0})
        self.begin(state)

        def evaluate() -> dict[str, float]:
            minutes = {f"time/train_{k}_minutes": v / 60 for k, v in spent.items()}
            return {**self.evaluate(), **minutes}

        try:
            if self.evaluates and engine.step == 0:
                engine.log(evaluate())
            while engine.step < config.max_steps:
                before, cpu, wall = engine.step, time.process_time(), time.perf_counter()
                metrics = self.train_step()
                spent["cpu"] += time.process_time() - cpu
                spent["wall"] += time.perf_counter() - wall
                engine.log(metrics)
                if engine.step < config.max_steps:  # the last checkpoint comes after the final evaluation
                    if self.evaluates and passes(before, engine.step, config.eval_steps):
                        engine.log(evaluate())
                    engine.maybe_checkpoint({**self.state_dict(), _SPENT: dict(spent)})
            if self.evaluates:
                engine.log(evaluate())
            engine.maybe_checkpoint({**self.state_dict(), _SPENT: dict(spent)}, force=True)
            self.export()
            engine.finish()
        except BaseException as error:  # the run folder says how the run ended, then the error goes on
            stopped = isinstance(error, (KeyboardInterrupt, SystemExit))
            engine.update_run_record(
                status="stopped" if stopped else "failed", step=engine.step, error=f"{type(error).__name__}: {error}"
            )
            raise
        return engine.history

    @property
    def history(self) -> list[dict[str, float]]:
        """The metrics logged so far (`Engine.history`: one row per `Engine.log` call, with its step)."""
        return self.engine.history

    @property
    def evaluates(self) -> bool:
        """Whether the run has an evaluation (prompts or held-out data)."""
        return False

    def begin(self, state: dict[str, Any] | None) -> None:
        """Before the first step: restore the trainer's checkpoint `state` (None: a fresh run)."""
        if state is not None:
            self.load_state_dict(state)

    def train_step(self) -> dict[str, float]:
        """Take one or more optimizer steps (`engine.optimizer_step`); returns their metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """The evaluation's metrics (`eval/...`), the same on every process."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the engine's state (JSON-serializable or tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output."""

    def export(self) -> None:
        """After the last checkpoint, before the engine writes the final weights: the trainer's own files."""


def passes(before: int, after: int, every: int) -> bool:
    """Whether going from step `before` to `after` passes (or lands on) a multiple of `every` (0: never)."""
    return every > 0 and before // every < after // every
