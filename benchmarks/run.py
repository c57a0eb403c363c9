"""Time-to-target benchmark: `python -m benchmarks.run --quick|--full [--tasks ...] [--optimizers ...]`.

For every task and optimizer it trains at each learning rate of the optimizer's grid (`--full`)
or at its one quick LR (`--quick`), keeps the best run (`benchmarks.report`), and writes
`<out>/<mode>.json`, `<out>/<mode>.md` and one `<out>/<mode>_<task>.png` per task. AdamW,
the baseline of every ratio, is always run. A run that raises is recorded as failed, with the
error, and the benchmark goes on. `--quick` stops each run at the target and
finishes in under 3 minutes on 2 CPU cores; `--full` runs every step budget to the end, for
complete curves, in about half an hour.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.optimizers import OPTIMIZERS
from benchmarks.plots import plot_task
from benchmarks.report import BASELINE, lr_text, markdown, summarize, write_json
from benchmarks.tasks import TASKS, Task
from benchmarks.train import NOT_RUN, RunResult, train

THREADS = 2
RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Mode:
    """How thoroughly to benchmark."""

    name: str
    grid: bool  # every LR of the optimizer's grid, or only its quick LR
    quick_targets: bool  # each task's quick_target instead of its target
    stop_at_target: bool
    time_budget: float  # training seconds per run
    max_steps: int | None = None  # None: each task's own step budget

    def target(self, task: Task) -> float:
        return task.quick_target if self.quick_targets else task.target

    def steps(self, task: Task) -> int:
        return self.max_steps or task.max_steps


MODES = {
    "quick": Mode("quick", grid=False, quick_targets=True, stop_at_target=True, time_budget=2.5),
    "full": Mode("full", grid=True, quick_targets=False, stop_at_target=False, time_budget=25.0),
}


def run(mode: Mode, task_names: list[str], optimizer_names: list[str], out: Path, threads: int = THREADS,
        cpu_time: bool = False) -> list[dict]:
    """Benchmark every (task, optimizer) pair, write the JSON, markdown and plots into `out`; return the entries.
    `cpu_time`: the seconds (and the time budget) are the training thread's CPU time (time.thread_time), which
    other processes on a shared machine inflate far less than wall time; meant with threads=1."""
    torch.set_num_threads(threads)
    if BASELINE not in optimizer_names:
        optimizer_names = [BASELINE, *optimizer_names]
    start = time.perf_counter()
    tasks = {name: TASKS[name]() for name in task_names}
    runs: list[RunResult] = []
    for task in tasks.values():
        _warm_up(task)
        for name in optimizer_names:
            spec = OPTIMIZERS[name]
            for lr in spec.lrs if mode.grid else (spec.quick_lr,):
                try:
                    result = train(task, spec, lr, mode.target(task), mode.steps(task), mode.stop_at_target,
                                   mode.time_budget, clock=time.thread_time if cpu_time else time.perf_counter)
                except Exception as error:  # one broken optimizer must not end the whole benchmark
                    result = RunResult(task.name, name, lr, status="failed", reason=f"{type(error).__name__}: {error}")
                runs.append(result)
                print(_progress(result), flush=True)
                if result.status == "skipped":
                    break
    entries = summarize(runs)
    meta = {
        "mode": mode.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "clock": "cpu" if cpu_time else "wall",
        "seconds": time.perf_counter() - start,
        "settings": dataclasses.asdict(mode),
        "tasks": {name: {"target": mode.target(t), "train_target": t.train_target, "max_steps": mode.steps(t),
                         "eval_every": t.eval_every, "batch_size": t.batch_size} for name, t in tasks.items()},
        "optimizers": {name: {"source": OPTIMIZERS[name].source, "lrs": OPTIMIZERS[name].lrs,
                              "quick_lr": OPTIMIZERS[name].quick_lr} for name in optimizer_names},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{mode.name}.json", meta, entries)
    (out / f"{mode.name}.md").write_text(markdown(meta, entries))
    for name, task in tasks.items():
        plot_task(out / f"{mode.name}_{name}.png", name, mode.target(task), [e for e in entries if e["task"] == name])
    return entries


def _warm_up(task: Task) -> None:
    """One untimed forward and backward, so that the process's one-time set-up (thread pools,
    allocator caches) is not charged to the time and memory of the task's first run."""
    x, y = next(task.batches(0))
    task.loss_fn(task.make_model(0)(x), y).backward()


def _progress(r: RunResult) -> str:
    if r.status in NOT_RUN:
        return f"{r.task:<20} {r.optimizer:<20} lr={lr_text(r.lr):<8} {r.status}: {r.reason}"
    return (f"{r.task:<20} {r.optimizer:<20} lr={lr_text(r.lr):<8} {r.status:<12} steps={r.steps:<5} "
            f"to_target={r.steps_to_target} in {r.seconds_to_target and round(r.seconds_to_target, 2)} s "
            f"to_train_target={r.steps_to_train_target} in "
            f"{r.seconds_to_train_target and round(r.seconds_to_train_target, 2)} s "
            f"final={r.final_loss:.4f} fwd_bwd={r.fwd_bwd_ms:.2f}ms step={r.opt_step_ms:.2f}ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_const", dest="mode", const="quick", help="one LR per optimizer")
    which.add_argument("--full", action="store_const", dest="mode", const="full", help="the whole LR grid")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--max-steps", type=int, default=None, help="cap every task's step budget")
    parser.add_argument("--time-budget", type=float, default=None, help="training seconds per run")
    parser.add_argument("--stop-at-target", action="store_true", help="stop each run once it reached both targets")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder for the results (default: %(default)s)")
    parser.add_argument("--cpu-time", action="store_true", help="seconds are the training thread's CPU time "
                        "(time.thread_time), not wall time: for a shared machine, with --threads 1")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    mode = MODES[args.mode]
    if args.max_steps or args.time_budget or args.stop_at_target:
        mode = dataclasses.replace(mode, max_steps=args.max_steps or mode.max_steps,
                                   time_budget=args.time_budget or mode.time_budget,
                                   stop_at_target=mode.stop_at_target or args.stop_at_target)
    run(mode, args.tasks, args.optimizers, args.out, args.threads, args.cpu_time)
    print(f"wrote {args.out}/{args.mode}.json, .md and plots in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
