"""Steps to target of optimizer variants: the measurements behind gnfx's default hyperparameters.

    python -m benchmarks.defaults --tasks digits_mlp digits_cnn --seeds 0 1 \\
        kfac kfac:fisher=mc kfac:stat_every=1,inv_every=1 ekfac:step=quadratic adamw@1e-2

A variant is `OPTIMIZER[:key=value,...]` (gnfx.compile(model, optimizer=OPTIMIZER, loss=<the
task's loss>, key=value, ...), no lr unless given as a key: what a user gets at those settings)
or `adamw@LR`. Values are read as Python literals where they parse (1e-3, 0.9, True), as strings
otherwise. `--constant NAME=VALUE` sets a module constant of gnfx.quadratic_step (LAMBDA_MIN,
QUADRATIC_DAMPING, ...) for the whole sweep. Each run is benchmarks.train.train on the task with `--stop-at-target` semantics (it
stops once both the validation and the training-loss target are reached), one intra-op thread.
`--cpu-time` counts the seconds as the CPU time of the training thread (time.thread_time; the runs use
one intra-op thread), which other processes on a shared machine barely move, instead of wall seconds.
`--run-out` trains every run for its whole step budget instead (the steps to the targets are the
same; the final validation loss is then the loss after the budget, comparable across variants).
Prints one line per run and a markdown table: steps to the validation and to the training-loss
target, the seconds to them, the median optimizer step and the final validation loss; `--json FILE`
keeps every run.
Steps are exact and reproducible; seconds depend on the load of the machine.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time
from pathlib import Path

import torch

from gnfx import quadratic_step

from benchmarks.optimizers import OPTIMIZERS, OptimizerSpec, _gnfx, _gnfx_unsupported
from benchmarks.tasks import TASKS
from benchmarks.train import NOT_RUN, train

DIGITS = ("digits_mlp", "digits_autoencoder", "digits_cnn")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def variant_settings(variant: str) -> tuple[str, dict]:
    """(optimizer, settings) of `OPTIMIZER[:key=value,...]`, each value a Python literal or else a string."""
    optimizer, _, settings = variant.partition(":")
    return optimizer, {k: _value(v) for k, v in (item.split("=", 1) for item in settings.split(",") if item)}


def variant_spec(variant: str) -> tuple[OptimizerSpec, float | None]:
    """(the OptimizerSpec of `variant`, its lr): `adamw@LR` or `OPTIMIZER[:key=value,...]`."""
    if "@" in variant:
        name, lr = variant.split("@")
        return dataclasses.replace(OPTIMIZERS[name], name=variant), float(lr)
    optimizer, fixed = variant_settings(variant)
    return OptimizerSpec(variant, "gnfx", (None,), None, _gnfx(optimizer, **fixed), _gnfx_unsupported(),
                         needs_loss=True), None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="OPTIMIZER[:key=value,...] or adamw@LR")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DIGITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-steps", type=int, default=None, help="cap every task's step budget")
    parser.add_argument("--constant", nargs="+", default=[], metavar="NAME=VALUE",
                        help="set a constant of gnfx.quadratic_step for every run")
    parser.add_argument("--run-out", action="store_true", help="train every run for its whole step budget")
    parser.add_argument("--cpu-time", action="store_true",
                        help="seconds are the training thread's CPU time (time.thread_time), not wall time")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for item in args.constant:
        name, value = item.split("=", 1)
        if not hasattr(quadratic_step, name):
            parser.error(f"gnfx.quadratic_step has no constant {name}")
        setattr(quadratic_step, name, _value(value))
    tasks = {name: TASKS[name]() for name in args.tasks}
    rows, runs = [], []
    for task in tasks.values():
        steps = min(args.max_steps or task.max_steps, task.max_steps)
        for variant in args.variants:
            spec, lr = variant_spec(variant)
            for seed in args.seeds:
                start = time.perf_counter()
                r = train(task, spec, lr, task.target, steps, not args.run_out, float("inf"), seed=seed,
                          clock=time.thread_time if args.cpu_time else time.perf_counter)
                if r.status in NOT_RUN:
                    print(f"{task.name} {variant} seed={seed}: {r.status}: {r.reason}", flush=True)
                    continue
                print(f"{task.name:<19} {variant:<45} seed={seed} {r.status:<11} val={r.steps_to_target} "
                      f"train={r.steps_to_train_target} s={_seconds(r.seconds_to_target)}/{_seconds(r.seconds_to_train_target)} "
                      f"step={r.opt_step_ms:.1f}ms fwd_bwd={r.fwd_bwd_ms:.1f}ms "
                      f"final={r.final_loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
                runs.append({"task": task.name, "variant": variant, "seed": seed, "max_steps": steps,
                             **{k: v for k, v in dataclasses.asdict(r).items() if k != "curve"}})
                rows.append(f"| {task.name} | `{variant}` | {seed} | {r.steps_to_target or f'> {r.steps}'} | "
                            f"{r.steps_to_train_target or f'> {r.steps}'} | {_seconds(r.seconds_to_target)} | "
                            f"{_seconds(r.seconds_to_train_target)} | {r.opt_step_ms:.1f} | {r.final_loss:.4f} | {r.status} |")
    print("\n| task | variant | seed | steps to val | steps to train | s to val | s to train | step ms | final val | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


def _seconds(s: float | None) -> str:
    return "–" if s is None else f"{s:.2f}"


if __name__ == "__main__":
    main()
