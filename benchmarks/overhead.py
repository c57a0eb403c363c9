"""Step-overhead micro-benchmark: `python -m benchmarks.overhead [--widths ...] [--repeats N]`.

On MLPs width-width-width-10 (batch 128, random data) of growing width, it times
- forward+backward of the plain module, and `torch.optim.AdamW(foreach=True).step()`;
- for each gnfx preconditioner: forward+backward of the gnfx-compiled module, and `model.step()`,
and writes `<out>/overhead.json` and `<out>/overhead.md` with the ratios gnfx / plain and
gnfx / AdamW. Each number is the median over `repeats` timed steps after `warmup` untimed ones,
the optimizers stepping in turn; the mean is recorded too, since periodic work (statistics
every few steps, refreshed inverses) shows in the mean and not in the median. gnfx entries
that cannot run are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.models import mlp
from benchmarks.optimizers import OPTIMIZERS, Trainer, Unavailable, torch_trainer

THREADS = 2
BATCH = 128
LR = 1e-3
RESULTS = Path(__file__).parent / "results"


def timed_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One step: milliseconds of forward+backward and of `step()` (`zero_grad()` untimed)."""
    t0 = time.perf_counter()
    F.cross_entropy(trainer.module(x), y).backward()
    t1 = time.perf_counter()
    trainer.step()
    t2 = time.perf_counter()
    trainer.zero_grad()
    return 1e3 * (t1 - t0), 1e3 * (t2 - t1)


def measure(width: int, warmup: int, repeats: int) -> dict:
    """The timings of AdamW and of every gnfx preconditioner on the MLP of `width`.

    The optimizers take their steps in turn (AdamW, then each gnfx one, then AdamW again...), so
    that load from other processes falls on all of them alike and the ratios stay comparable.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, width, generator=generator)
    y = torch.randint(10, (BATCH,), generator=generator)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return mlp([width, width, width, 10])

    plain = model()
    trainers = {"adamw": torch_trainer(plain, torch.optim.AdamW(plain.parameters(), lr=LR, foreach=True))}
    row = {"width": width, "params": sum(p.numel() for p in plain.parameters()), "gnfx": {}}
    gnfx = [spec for spec in OPTIMIZERS.values() if spec.source == "gnfx"]
    for spec in gnfx:
        try:
            trainers[spec.name] = spec.make(model(), LR)
            timed_step(trainers[spec.name], x, y)  # gnfx may decline a model at its first step
        except (Unavailable, *spec.unsupported) as error:
            trainers.pop(spec.name, None)
            row["gnfx"][spec.name] = {"skipped": str(error)}
    times = {name: ([], []) for name in trainers}
    for i in range(warmup + repeats):
        for name, trainer in trainers.items():
            fwd_bwd, step = timed_step(trainer, x, y)
            if i >= warmup:
                times[name][0].append(fwd_bwd)
                times[name][1].append(step)
    summary = {name: {"fwd_bwd_ms": statistics.median(fwd_bwd), "fwd_bwd_mean_ms": statistics.fmean(fwd_bwd),
                      "step_ms": statistics.median(step), "step_mean_ms": statistics.fmean(step)}
               for name, (fwd_bwd, step) in times.items()}
    row["adamw"] = baseline = summary.pop("adamw")
    for name, timings in summary.items():
        timings["fwd_bwd_ratio"] = timings["fwd_bwd_ms"] / baseline["fwd_bwd_ms"]
        timings["step_ratio_vs_adamw"] = timings["step_ms"] / baseline["step_ms"]
        row["gnfx"][name] = timings
    return row


def markdown(rows: list[dict], repeats: int) -> str:
    """A table per width: milliseconds (median, mean) and the ratios to plain forward+backward and to AdamW."""
    lines = ["# gnfx step overhead", "",
             f"MLP width-width-width-10, batch {BATCH}, {THREADS} threads, medians over {repeats} steps "
             "(means in parentheses). fwd+bwd ratio: gnfx-compiled / plain module; "
             "step ratio: gnfx `model.step()` / AdamW(foreach) `step()`.", ""]
    for row in rows:
        base = row["adamw"]
        lines += [f"## width {row['width']} ({row['params']:,} parameters)", "",
                  "| optimizer | fwd+bwd ms | step ms | fwd+bwd ratio | step ratio vs AdamW |",
                  "|---|---|---|---|---|",
                  f"| AdamW (plain module) | {base['fwd_bwd_ms']:.2f} ({base['fwd_bwd_mean_ms']:.2f}) "
                  f"| {base['step_ms']:.2f} ({base['step_mean_ms']:.2f}) | 1.00 | 1.00 |"]
        skipped = []
        for name, t in row["gnfx"].items():
            if "skipped" in t:
                skipped.append(f"- skipped {name}: {t['skipped']}")
                continue
            lines.append(f"| {name} | {t['fwd_bwd_ms']:.2f} ({t['fwd_bwd_mean_ms']:.2f}) "
                         f"| {t['step_ms']:.2f} ({t['step_mean_ms']:.2f}) "
                         f"| {t['fwd_bwd_ratio']:.2f} | {t['step_ratio_vs_adamw']:.2f} |")
        lines += ["", *skipped, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder for the results (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rows = []
    for width in args.widths:
        rows.append(measure(width, args.warmup, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"batch": BATCH, "threads": THREADS, "repeats": args.repeats,
                                                        "warmup": args.warmup, "rows": rows}, indent=1) + "\n")
    (args.out / "overhead.md").write_text(markdown(rows, args.repeats))
    return rows


if __name__ == "__main__":
    main()
