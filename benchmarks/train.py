"""One timed training run: a task, an optimizer, a learning rate → a `RunResult`.

Each step is timed in two parts: forward+backward (`loss_fn(module(x), y).backward()`) and the
optimizer (`step()` then `zero_grad()`). The validation loss is evaluated every
`task.eval_every` steps on the original module (the same parameters, without any optimizer
hooks), outside the timed parts, and so is the training loss on the task's fixed training examples
(`task.fit_loss`) for the training-loss target; seconds to target count training time only. Peak memory is
the resident-set growth over the whole run (`benchmarks.memory`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from benchmarks.memory import PeakMemory
from benchmarks.optimizers import OptimizerSpec, Trainer, Unavailable
from benchmarks.tasks import Task

NOT_RUN = ("skipped", "failed")  # statuses of runs that did not train
DIVERGENCE_FACTOR = 3.0  # a validation loss above this multiple of the initial one counts as diverged


@dataclasses.dataclass
class CurvePoint:
    """The state at one evaluation: step, training seconds so far, validation and mean training loss,
    and the loss on the fixed training examples."""

    step: int
    seconds: float
    val_loss: float
    train_loss: float | None  # mean over the steps since the previous evaluation
    fit_loss: float | None = None  # on task.x_fit, task.y_fit


@dataclasses.dataclass
class RunResult:
    """The outcome of one run.

    `status` is reached, not reached (in max_steps), diverged, time budget (ran out of training
    seconds), skipped (cannot run here) or failed (raised an error); `reason` explains the last two.
    """

    task: str
    optimizer: str
    lr: float | None  # None: the optimizer's defaults, no lr given
    status: str
    reason: str = ""
    steps: int = 0
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    steps_to_train_target: int | None = None  # the training-loss target, on task.fit_loss
    seconds_to_train_target: float | None = None
    train_seconds: float = 0.0
    # CPU seconds of this thread (time.thread_time) in the same steps: what other processes barely move
    cpu_seconds_to_target: float | None = None
    cpu_seconds_to_train_target: float | None = None
    train_cpu_seconds: float = 0.0
    final_loss: float | None = None
    fwd_bwd_ms: float | None = None  # median over steps
    opt_step_ms: float | None = None  # median over steps
    peak_mem_mb: float | None = None
    curve: list[CurvePoint] = dataclasses.field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.steps_to_target is not None

    @property
    def reached_train(self) -> bool:
        return self.steps_to_train_target is not None


def _timed_step(task: Task, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float]:
    """One training step: the loss, the seconds of forward+backward and of step+zero_grad, and the
    CPU seconds of this thread for both."""
    t0, c0 = time.perf_counter(), time.thread_time()
    loss = task.loss_fn(trainer.module(x), y)
    loss.backward()
    t1 = time.perf_counter()
    trainer.step()
    trainer.zero_grad()
    t2, c2 = time.perf_counter(), time.thread_time()
    return loss.item(), t1 - t0, t2 - t1, c2 - c0


def train(task: Task, spec: OptimizerSpec, lr: float | None, target: float, max_steps: int, stop_at_target: bool,
          time_budget: float, seed: int = 0) -> RunResult:
    """Train `task`'s model with `spec` at `lr` for up to `max_steps` steps or `time_budget` training seconds.

    The run has reached `target` at the first evaluation whose validation loss is at most it, and
    the training-loss target at the first whose `task.fit_loss` is at most `task.train_target`;
    `stop_at_target` stops when both are reached.
    """
    result = RunResult(task.name, spec.name, lr, status="not reached")
    model = task.make_model(seed)
    initial = task.eval_loss(model)
    result.curve.append(CurvePoint(0, 0.0, initial, None, task.fit_loss(model)))
    fwd_bwd, opt_step, window_losses = [], [], []
    with PeakMemory() as memory:
        try:
            trainer = spec.make(model, lr, task.loss_name)
        except Unavailable as error:
            return dataclasses.replace(result, status="skipped", reason=str(error), curve=[])
        batches = task.batches(seed)
        for step in range(1, max_steps + 1):
            try:
                loss, fwd_bwd_s, opt_step_s, cpu_s = _timed_step(task, trainer, *next(batches))
            except spec.unsupported as error:
                if step > 1:
                    raise
                return dataclasses.replace(result, status="skipped", curve=[],
                                           reason=f"first step raised {type(error).__name__}: {error}")
            fwd_bwd.append(fwd_bwd_s)
            opt_step.append(opt_step_s)
            window_losses.append(loss)
            result.steps, result.train_seconds = step, result.train_seconds + fwd_bwd_s + opt_step_s
            result.train_cpu_seconds += cpu_s
            if step % task.eval_every and step != max_steps and result.train_seconds <= time_budget:
                continue
            val, fit = task.eval_loss(model), task.fit_loss(model)
            result.curve.append(CurvePoint(step, result.train_seconds, val, statistics.fmean(window_losses), fit))
            window_losses = []
            if not math.isfinite(val) or val > DIVERGENCE_FACTOR * initial:
                result.status = "diverged"
                break
            if val <= target and not result.reached:
                result.status = "reached"
                result.steps_to_target, result.seconds_to_target = step, result.train_seconds
                result.cpu_seconds_to_target = result.train_cpu_seconds
            if fit <= task.train_target and not result.reached_train:
                result.steps_to_train_target, result.seconds_to_train_target = step, result.train_seconds
                result.cpu_seconds_to_train_target = result.train_cpu_seconds
            if stop_at_target and result.reached and result.reached_train:
                break
            if result.train_seconds > time_budget:
                if not result.reached:
                    result.status = "time budget"
                break
    result.final_loss = result.curve[-1].val_loss
    result.fwd_bwd_ms = 1e3 * statistics.median(fwd_bwd)
    result.opt_step_ms = 1e3 * statistics.median(opt_step)
    result.peak_mem_mb = memory.peak_mb
    return result
