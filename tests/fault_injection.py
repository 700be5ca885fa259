"""Fault injection for the drills. Test code only: nothing under platform/r2v knows about it.

The faults must fire inside Ray worker processes (Ray Train workers, Tune trial actors), which cannot import
this file (tests/ is not on their path), so the module asks Ray's cloudpickle to ship it by value. A drill
injects a fault by wrapping what the stage hands to Ray: monkeypatch the stage's `fit` / `sweep_trial` with
the wrappers below, and pass `InterruptOnce` as an extra Tune callback.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray.cloudpickle
from ray.tune import Callback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def claim(marker: str | Path) -> bool:
    """True for exactly one caller while `marker` exists (unlink is atomic): a fault that fires once."""
    try:
        os.unlink(marker)
        return True
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------- Ray Train
def dies_once_after_checkpoint(objective_cls: type, marker: str | Path, rank: int = 1) -> type:
    """`objective_cls` whose worker of `rank` exits the process (`os._exit`, a hard crash) at its first
    training step after it reported a checkpoint, once: it writes `marker` first, and does nothing while
    `marker` exists (so the restarted worker group, or a re-run of the stage, trains on)."""
    marker = str(marker)

    class DiesOnceAfterCheckpoint(objective_cls):
        def prepare(self, ctx) -> None:
            import ray.train

            super().prepare(ctx)
            self._checkpointed = False
            real = ray.train.report

            def report(metrics, *args, checkpoint=None, **kwargs):  # the loop calls ray.train.report each time
                real(metrics, *args, checkpoint=checkpoint, **kwargs)
                self._checkpointed = self._checkpointed or checkpoint is not None

            ray.train.report = report  # this worker process only; it dies with the run
            self._rank = ctx.rank
            # TRL's SFTTrainer computes its own loss: die in its training step too (bc.trainer=trl)
            from transformers import Trainer

            step, objective = Trainer.training_step, self

            def training_step(trainer, *args, **kwargs):
                objective._maybe_die()
                return step(trainer, *args, **kwargs)

            Trainer.training_step = training_step

        def _maybe_die(self) -> None:
            if self._rank == rank and self._checkpointed and not Path(marker).exists():
                Path(marker).write_text("killed once\n")
                time.sleep(5.0)  # let the controller register the checkpoint first (slow under load)
                os._exit(1)

        def loss(self, engine, batch, ctx):
            self._maybe_die()
            return super().loss(engine, batch, ctx)

    return DiesOnceAfterCheckpoint


def fit_with_objective(fit: Callable[..., Any], wrap: Callable[[type], type]) -> Callable[..., Any]:
    """`r2v.train.common.fit` with `wrap` applied to its objective class; monkeypatch a stage's `fit` with it."""

    @functools.wraps(fit)
    def wrapped(cfg, **kwargs):
        return fit(cfg, **{**kwargs, "objective_cls": wrap(kwargs["objective_cls"])})

    return wrapped


# ----------------------------------------------------------------------------------------- Ray Tune
def traced_trial(trial: Callable[..., None], trace_dir: str | Path, fail_marker: str | Path | None = None,
                 fail_epoch: int = 2) -> Callable[..., None]:
    """The sweep's trial function, plus: each (re)start touches `<trace_dir>/<trial id>-from<epoch>-<ns>`
    (epoch = the checkpoint it resumed from, 0 for a fresh start); while `fail_marker` exists, ONE trial
    raises once, right after it reported (and checkpointed) epoch `fail_epoch`."""
    trace_dir, fail_marker = str(trace_dir), str(fail_marker) if fail_marker else None

    @functools.wraps(trial)
    def wrapped(config, **params):
        import ray.tune
        import torch

        from r2v.tune.trainable import STATE_FILE

        start = 0
        ckpt = ray.tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int(torch.load(Path(d) / STATE_FILE, weights_only=False)["epoch"])
        trial_id = ray.tune.get_context().get_trial_id()
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        (Path(trace_dir) / f"{trial_id}-from{start}-{time.time_ns()}").touch()
        real = ray.tune.report

        def report(metrics, *args, **kwargs):
            real(metrics, *args, **kwargs)
            done = int(metrics["epoch"]) + 1  # `epoch` is the 0-based index of the epoch just trained
            if fail_marker and done == fail_epoch and claim(fail_marker):
                raise RuntimeError(f"simulated interruption of trial {trial_id} after epoch {done} (fault injection)")

        ray.tune.report = report  # this trial actor only, for this trial
        try:
            trial(config, **params)
        finally:
            ray.tune.report = real

    return wrapped


class InterruptOnce(Callback):
    """Once `after` trials have finished, send this (driver) process SIGUSR1, which Tune treats like Ctrl+C:
    it stops the run and saves the experiment state (a killed driver, but without the kill). Fires only while
    `marker` exists; writes the ids of the finished trials to `record`."""

    def __init__(self, after: int, marker: str | Path, record: str | Path):
        self.after, self.marker, self.record = after, str(marker), str(record)
        self.done: list[str] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done.append(trial.trial_id)
        if len(self.done) >= self.after and claim(self.marker):
            Path(self.record).write_text("\n".join(self.done))
            os.kill(os.getpid(), signal.SIGUSR1)
