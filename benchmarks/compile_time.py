"""What compiling the generated update costs and gains: `python -m benchmarks.compile_time`.

Per model of benchmarks/targets.py and curvature preconditioner, gnfx at its defaults except
`compile`, in one process with an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR, as for a
new user):

  first steps     wall-clock seconds of `model.step()` on step 0 (a statistic step, which compiles the graph
                  for collect=True) plus step 1 (a plain step, the graph for collect=False), with
                  compile=True and with compile=False; "overhead" is their difference, the price
                  of compiling (the rule for compile="auto" allows 2 s)
  update ms       the median `model.step()` (wall-clock, or with `--clock cpu` the thread's CPU time)
                  of the plain steps among steps STEADY..STEADY+N,
                  eager and compiled, and the steps the compiled one needs to earn its overhead back

Writes `<out>/compile_time.json` and `<out>/compile_time.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import gnfx
import benchmarks.targets
from benchmarks.targets import RESULTS, STAT_EVERY, add_timing_arguments, models, use_timing_arguments

PRECONDITIONERS = ("kfac", "shampoo", "soap", "rank1")
STEADY = 2 * STAT_EVERY  # steps before the steady-state window (past Shampoo's start at step 10)


def step_times(make, batch, loss_fn, preconditioner: str, use_compile: bool, steps: int) -> list[float]:
    """(wall-clock, clock) seconds of each `model.step()` of a fresh compile, steps 0..steps-1 (the
    clock of benchmarks.targets: wall, or this thread's CPU time), on benchmarks.targets.DEVICE."""
    x, y = (t.to(benchmarks.targets.DEVICE) for t in batch)
    c = gnfx.compile(make().to(benchmarks.targets.DEVICE), preconditioner, lr=1e-4, compile=use_compile)
    times = []
    for _ in range(steps):
        loss_fn(c(x), y).backward()
        benchmarks.targets.synchronize()
        t, u = time.perf_counter(), benchmarks.targets.clock()
        c.step()
        benchmarks.targets.synchronize()
        times.append((time.perf_counter() - t, benchmarks.targets.clock() - u))
        c.zero_grad()
    return times


def measure(make, batch, loss_fn, preconditioner: str, window: int) -> dict:
    steps = STEADY + window
    eager = step_times(make, batch, loss_fn, preconditioner, False, steps)
    compiled = step_times(make, batch, loss_fn, preconditioner, True, steps)
    plain = [i for i in range(STEADY, steps) if i % STAT_EVERY]  # no statistics, no refresh
    row = {"first_eager_s": eager[0][0] + eager[1][0], "first_compiled_s": compiled[0][0] + compiled[1][0],
           "eager_ms": 1e3 * statistics.median(eager[i][1] for i in plain),
           "compiled_ms": 1e3 * statistics.median(compiled[i][1] for i in plain)}
    row["overhead_s"] = row["first_compiled_s"] - row["first_eager_s"]
    gain_ms = row["eager_ms"] - row["compiled_ms"]
    row["break_even_steps"] = 1e3 * row["overhead_s"] / gain_ms if gain_ms > 0 else None
    return row


def markdown(rows: dict, command: str) -> str:
    lines = ["# Compiling the generated update: its price and its gain", "",
             f"torch {torch.__version__}, {benchmarks.targets.device_name()}, {benchmarks.targets.clock_name()} for the "
             "update ms (wall-clock for the first steps), an empty inductor cache; "
             "`" + command + "`. \"first steps\": `model.step()` of steps 0 (statistic) "
             "and 1 (plain), which compile the two graphs; \"update ms\": the median plain `model.step()` "
             f"of steps {STEADY}+; break-even: the steps the compiled update needs to repay its overhead "
             "(none: it gains nothing). compile=\"auto\" allows a first compiled step at most 2 s over eager.", "",
             "| model | preconditioner | first steps eager s | compiled s | overhead s | update ms eager "
             "| compiled | break-even steps |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, pre), r in ((k.split("/"), v) for k, v in rows.items()):
        even = f"{r['break_even_steps']:.0f}" if r["break_even_steps"] is not None else "none"
        lines.append(f"| {model} | {pre} | {r['first_eager_s']:.2f} | {r['first_compiled_s']:.1f} "
                     f"| {r['overhead_s']:.1f} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {even} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_mlp", "char_gpt", "mlp1024"],
                        help="a subset of: digits_mlp, digits_cnn, char_gpt, mlp1024, mlp2048")
    parser.add_argument("--preconditioners", nargs="+", default=list(PRECONDITIONERS))
    parser.add_argument("--window", type=int, default=STAT_EVERY, help="steps of the steady-state window")
    add_timing_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    use_timing_arguments(parser, args)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gnfx_compile_time_")  # cold, as for a new user
    rows = {}
    for name, make, batch, loss_fn in models():
        if name not in args.models:
            continue
        for pre in args.preconditioners:
            rows[f"{name}/{pre}"] = measure(make, batch, loss_fn, pre, args.window)
            print(name, pre, json.dumps(rows[f"{name}/{pre}"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python -m benchmarks.compile_time", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "compile_time.md").write_text(markdown(rows, command))
    return rows


if __name__ == "__main__":
    main()
