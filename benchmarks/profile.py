"""Where a gnfx step spends its time: `python -m benchmarks.profile [--models ...] [--runs N]`.

Three tables, written to `<out>/profile.md` (and `profile.json`), on the models of
benchmarks/targets.py at gnfx's defaults:

1. Step breakdown per model and preconditioner: medians (ms) of the forward+backward and of
   `model.step()` on plain steps and on statistic steps (which also refresh, at the defaults),
   their average over `stat_every` steps against plain fwd+bwd + AdamW, and the FLOP model of
   one step's preconditioner products, Σ_blocks 2 (d_out² d_a + d_out d_a²), against the
   forward+backward's Σ 6 R d_a d_out (R rows).
2. torch.profiler's top operators of one plain step and one refresh step (the widest model).
3. The refresh's decompositions alone, for one n x n factor: its eigendecomposition (float32 and
   float64, on one thread and on all), and gnfx.linalg's (F + λI)^{-1} by Cholesky and by the
   coupled Newton iteration (threads as gnfx chooses them: "gnfx"), min and median of `runs` runs
   each, since the CPU's timings vary from run to run.

With `--parts R [R ...]` instead: the whole step of each preconditioner split into its parts on the
rows-per-step sweep's MLP (benchmarks/targets.py) at R rows per width, written to
`<out>/step_parts.md` (and `step_parts.json`): per step, averaged over stat_every steps, the plain
forward+backward, the taps (a statistic step's forward+backward over the plain one, amortized), and
of `model.step()`: the preconditioner's statistics from gradients (`collect`), its refresh
(amortized over its frequency; rank1's sketch update and D on statistic steps), its direction (the
products), the grafting (the chain's Graft stage), the rest of the chain (KL clipping, momentum, weight
decay and the parameter update: gnfx.transforms), the
non-finite check, and the rest (stacking the gradients, folding statistics, Python); each part timed
by wrapping the method that computes it, medians over `windows` windows interleaved with AdamW's.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import gnfx
from benchmarks import targets
from benchmarks.models import mlp
from benchmarks.targets import RESULTS, STAT_EVERY, models, products, seconds, statistic_rows
from gnfx.linalg import damped_inverse_power
from gnfx.transforms import Graft

PRECONDITIONERS = ("diag", "rank1", "kfac", "shampoo")
SIZES = (128, 256, 512, 1024, 2048)


WARM_WINDOWS = 2  # untimed windows of stat_every steps: compiling, and Shampoo's start at step 10


def breakdown(make, batch, loss_fn, rounds: int) -> dict:
    x, y = batch
    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=True)
    base = []
    for _ in range(STAT_EVERY * (rounds + 1)):
        t = seconds(lambda: loss_fn(plain(x), y).backward())
        base.append(t + seconds(adamw.step))
        adamw.zero_grad()
    out = {"base_ms": 1e3 * statistics.median(base[STAT_EVERY:])}
    for name in PRECONDITIONERS:
        c = gnfx.compile(make(), name, lr=1e-4)
        times = {"plain": [], "stat": []}
        for i in range(STAT_EVERY * (rounds + WARM_WINDOWS)):
            kind = "stat" if c.optimizer.statistic_step else "plain"
            fb = seconds(lambda: loss_fn(c(x), y).backward())
            if kind == "stat" and name == "kfac":  # FLOPs: 2 per multiply-add
                work = products(c, statistic_rows(c))
                out["apply_gflop"], out["fwd_bwd_gflop"] = 2e-9 * work["preconditioner"], 2e-9 * work["layers"]
            step = seconds(c.step)
            c.zero_grad()
            if i >= STAT_EVERY * WARM_WINDOWS:
                times[kind].append((fb, step))
        med = {k: (1e3 * statistics.median(f for f, _ in v), 1e3 * statistics.median(s for _, s in v))
               for k, v in times.items()}
        average = ((STAT_EVERY - 1) * sum(med["plain"]) + sum(med["stat"])) / STAT_EVERY
        out[name] = {"plain_fwd_bwd_ms": med["plain"][0], "plain_step_ms": med["plain"][1],
                     "stat_fwd_bwd_ms": med["stat"][0], "stat_step_ms": med["stat"][1],
                     "average_ms": average, "ratio": average / out["base_ms"],
                     "compiled_update": c.optimizer.update_function.compiled}
    return out


def top_operators(make, batch, loss_fn, name: str, refresh: bool, rows: int = 8) -> str:
    """torch.profiler's table of one step of `name` (a refresh step or a plain one)."""
    x, y = batch
    c = gnfx.compile(make(), name, lr=1e-4)
    for _ in range(2 * STAT_EVERY + (0 if refresh else 1)):  # warm; stop before a refresh or a plain step
        loss_fn(c(x), y).backward()
        c.step()
        c.zero_grad()
    loss_fn(c(x), y).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def refresh_timings(sizes, runs: int) -> list[dict]:
    threads = torch.get_num_threads()
    out = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        X = torch.randn(1, n, 2 * n, generator=g, dtype=torch.float64)
        F64 = X @ X.transpose(1, 2) / (2 * n)
        lam = torch.full((1,), 1e-3, dtype=torch.float64)
        # eigh alone on 1 and on all threads (the measurement behind gnfx.linalg.MULTITHREAD_FROM), then
        # gnfx's own (F + λI)^{-1} by Cholesky and by Newton, with the threads gnfx.linalg chooses
        for method, dtype, nthreads in [("eigh", torch.float32, 1), ("eigh", torch.float32, threads),
                                        ("eigh", torch.float64, 1), ("eigh", torch.float64, threads),
                                        ("cholesky", torch.float32, "gnfx"), ("newton", torch.float32, "gnfx")]:
            F = F64.to(dtype)
            if method == "eigh":
                torch.set_num_threads(nthreads)
                fn = lambda F=F: torch.linalg.eigh(F)  # noqa: E731
            else:
                torch.set_num_threads(threads)
                fn = lambda F=F, m=method: damped_inverse_power(F, lam.to(dtype), 1.0, dtype, method=m)  # noqa: E731
            fn()
            times = [seconds(fn) for _ in range(runs)]
            out.append({"n": n, "method": method, "dtype": str(dtype).replace("torch.", ""), "threads": nthreads,
                        "min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times)})
        torch.set_num_threads(threads)
    return out


def markdown(result: dict) -> str:
    lines = ["# Where the time goes", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, gnfx defaults (stat_every={STAT_EVERY}, "
             "compile='auto'). `python -m benchmarks.profile`.", "",
             "## 1. Step breakdown (median ms)", "",
             "Average = (9 plain steps + 1 statistic step) / 10, each fwd+bwd + step; ratio = average / (plain "
             "fwd+bwd + AdamW step). Apply = the preconditioner's products per step, 2(d_out² d_a + d_out d_a²) per "
             "block, against the layers' own 6 R d_in d_out.", "",
             "| model | base ms | optimizer | compiled | plain step: fwd+bwd / step | stat step: fwd+bwd / step "
             "| average | ratio | apply / fwd+bwd GFLOP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, r in result["breakdown"].items():
        for name in PRECONDITIONERS:
            e = r[name]
            flops = f"{r['apply_gflop']:.2f} / {r['fwd_bwd_gflop']:.2f}" if name in ("kfac", "shampoo") else ""
            lines.append(f"| {model} | {r['base_ms']:.2f} | {name} | {'yes' if e['compiled_update'] else 'no'} "
                         f"| {e['plain_fwd_bwd_ms']:.2f} / {e['plain_step_ms']:.2f} "
                         f"| {e['stat_fwd_bwd_ms']:.2f} / {e['stat_step_ms']:.1f} | {e['average_ms']:.2f} "
                         f"| {e['ratio']:.2f} | {flops} |")
    lines += ["", "## 2. Top operators (torch.profiler, self CPU time)", ""]
    for title, table in result["operators"].items():
        lines += [f"### {title}", "", "```", table.strip(), "```", ""]
    columns = list(dict.fromkeys((e["method"], e["dtype"], e["threads"]) for e in result["refresh"]))
    lines += ["## 3. The refresh's decompositions of one n x n factor (ms, min / median of "
              f"{result['runs']} runs)", "",
              "| n | " + " | ".join(f"{m} {d} {t if t == 'gnfx' else f'{t}T'}" for m, d, t in columns) + " |",
              "|---|" + "---|" * len(columns)]
    by_n = {}
    for e in result["refresh"]:
        by_n.setdefault(e["n"], {})[(e["method"], e["dtype"], e["threads"])] = e
    for n, cells in by_n.items():
        lines.append(f"| {n} | " + " | ".join(f"{cells[c]['min_ms']:.1f} / {cells[c]['median_ms']:.1f}"
                                              for c in columns) + " |")
    return "\n".join(lines) + "\n"


PARTS = ("fwd+bwd", "taps", "collect", "refresh", "direction", "grafting", "tail", "non-finite check", "rest of step")


def step_parts(names, rows: int, width: int = targets.SWEEP_WIDTH, windows: int = 5) -> dict:
    """The whole step of each preconditioner in `names` split into PARTS (module docstring), in
    seconds per step, on the sweep's MLP of `width` at `rows` rows per step, beside AdamW's
    forward+backward and step; medians over `windows` windows of stat_every steps (after two
    untimed ones), AdamW's window run before each of the preconditioner's."""
    g = torch.Generator().manual_seed(rows)
    pool = [(torch.randn(rows, width, generator=g), torch.randint(10, (rows,), generator=g))
            for _ in range(targets.SWEEP_POOL)]
    loss_fn = torch.nn.functional.cross_entropy

    def make():
        torch.manual_seed(0)
        return mlp([width, width, width, 10])

    spent = collections.defaultdict(float)  # part -> seconds in the current window

    def timed(part, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = targets.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += targets.clock() - t
        return wrapper

    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-4, foreach=True)

    def window(module, step, zero, statistic_step=lambda: False) -> dict:
        spent.clear()
        out = collections.defaultdict(float)
        for i in range(STAT_EVERY):
            x, y = pool[i % targets.SWEEP_POOL]
            stat = statistic_step()
            fb = seconds(lambda: loss_fn(module(x), y).backward())
            out["stat fwd+bwd" if stat else "fwd+bwd"] += fb
            out["step"] += seconds(step)
            zero()
        out = {k: v / STAT_EVERY for k, v in out.items()}
        return {**out, **{k: v / STAT_EVERY for k, v in spent.items()}}

    result = {"rows": rows, "width": width, "windows": windows}
    for name in names:
        c = gnfx.compile(make(), name, lr=1e-4)
        opt = c.optimizer
        for _ in range(2):  # untimed: the first steps and Shampoo's start at step 10
            window(c, c.step, c.zero_grad)
        patched = []  # (object, attribute, original)

        def patch(obj, attr, part):
            patched.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, timed(part, getattr(obj, attr)))
        stages = set()  # the chain's transform classes, timed by their __call__
        for pre in opt.curvature:
            for attr in ("collect", "refresh", "direction"):
                patch(pre, attr, attr)
            stages |= {type(t) for t in pre.chain}
        for stage in stages:
            patch(stage, "__call__", "grafting" if issubclass(stage, Graft) else "tail")
        patch(opt, "_non_finite", "non-finite check")
        base, parts = [], collections.defaultdict(list)
        try:
            for _ in range(windows):
                a = window(plain, adamw.step, adamw.zero_grad)
                base.append(a)
                w = window(c, c.step, c.zero_grad, lambda: opt.statistic_step)
                plain_fb = w["fwd+bwd"] * STAT_EVERY / (STAT_EVERY - 1)  # the mean over plain steps
                w["taps"] = (w.get("stat fwd+bwd", 0.0) - plain_fb / STAT_EVERY)
                w["fwd+bwd"] = plain_fb
                w["rest of step"] = w["step"] - sum(w.get(k, 0.0) for k in PARTS[2:-1])
                w["whole"] = w["fwd+bwd"] + w["taps"] + w["step"]
                w["ratio"] = w["whole"] / (a["fwd+bwd"] + a["step"])
                for k in (*PARTS, "step", "whole", "ratio"):
                    parts[k].append(w.get(k, 0.0))
        finally:
            for obj, attr, original in reversed(patched):
                setattr(obj, attr, original)
        result[name] = {k: statistics.median(v) for k, v in parts.items()}
        result.setdefault("adamw", {k: statistics.median(b[k] for b in base) for k in ("fwd+bwd", "step")})
    return result


def parts_markdown(results: list[dict], command: str) -> str:
    """One table per rows-per-step point: each part in ms per step and as a share of AdamW's whole step."""
    lines = ["# The whole step, part by part", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {targets.clock_name()}; gnfx defaults. "
             "Each cell: ms per step averaged over stat_every steps (the median over the windows), then in "
             "parentheses as a fraction of AdamW's whole step (plain fwd+bwd + AdamW step); benchmarks/profile.py's "
             f"docstring defines the parts. `{command}`.", ""]
    for r in results:
        names = [n for n in r if isinstance(r[n], dict) and n != "adamw"]
        a = r["adamw"]
        base = a["fwd+bwd"] + a["step"]
        lines += [f"## MLP {r['width']}-{r['width']}-{r['width']}-10, {r['rows']} rows per step "
                  f"(rows/width {r['rows'] / r['width']:g}; {r['windows']} windows)", "",
                  f"AdamW: fwd+bwd {1e3 * a['fwd+bwd']:.2f} ms, step {1e3 * a['step']:.2f} ms, whole "
                  f"{1e3 * base:.2f} ms.", "",
                  "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for part in (*PARTS, "step", "whole"):
            lines.append(f"| {part} | " + " | ".join(f"{1e3 * r[n][part]:.2f} ({r[n][part] / base:.3f})"
                                                    for n in names) + " |")
        lines.append("| whole / AdamW (median of paired windows) | " +
                     " | ".join(f"{r[n]['ratio']:.2f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="a subset of: mlp (digits), cnn, gpt, mlp1024, mlp2048")
    parser.add_argument("--rounds", type=int, default=3, help="windows of stat_every steps per preconditioner")
    parser.add_argument("--runs", type=int, default=5, help="runs of each decomposition")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--parts", type=float, nargs="+", default=None, metavar="ROWS_PER_WIDTH",
                        help="only the whole step split into parts at these rows per width (step_parts.md)")
    parser.add_argument("--windows", type=int, default=5, help="windows of stat_every steps for --parts")
    parser.add_argument("--parts-of", nargs="+", default=["rank1", "kfac", "shampoo"], help="preconditioners for --parts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    targets.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    targets.use_timing_arguments(parser, args)
    if args.parts:
        results = [step_parts(args.parts_of, round(r * targets.SWEEP_WIDTH), windows=args.windows) for r in args.parts]
        args.out.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.profile", *(sys.argv[1:] if argv is None else argv)])
        (args.out / "step_parts.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "step_parts.md").write_text(parts_markdown(results, command))
        return {"parts": results}
    chosen = [m for m in models() if not args.models or any(k in m[0] for k in args.models)]
    result = {"breakdown": {}, "operators": {}, "runs": args.runs}
    for name, make, batch, loss_fn in chosen:
        result["breakdown"][name] = breakdown(make, batch, loss_fn, args.rounds)
        print(name, json.dumps(result["breakdown"][name]), flush=True)
    widest, make, batch, loss_fn = chosen[-1]
    for pre in ("kfac", "shampoo", "rank1"):
        for refresh in (False, True):
            title = f"{widest}, {pre}, {'statistic + refresh' if refresh else 'plain'} step"
            result["operators"][title] = top_operators(make, batch, loss_fn, pre, refresh)
    result["refresh"] = refresh_timings(args.sizes, args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "profile.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
