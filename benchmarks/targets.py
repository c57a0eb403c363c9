"""The performance targets of gnfx, measured: `python -m benchmarks.targets [--repeats N]`.

Per model (the digits MLP, CNN and character GPT of benchmarks/tasks.py, and MLPs of width 1024
and 2048 on batches of 128), as medians of ratios of paired samples (one round measures every
quantity once, interleaved; `repeats` rounds, plus PAIRS extra forward+backward pairs) in one run,
everything at gnfx's defaults (compile="auto": the update is compiled for the two wide MLPs):

  no-stat fwd+bwd  instrumented forward+backward on a step that collects no statistics
                   / plain forward+backward (target <= 1.02)
  stat / bound     forward+backward on a statistic step (K-FAC's taps) / plain, divided by its
                   FLOP bound 1 + Σ R (d_in² + d_out²) / the layers' own products
                   (R the block's rows: the aᵀa and δᵀδ products against the layer's own products;
                   target <= 1.15)
  whole step       fwd+bwd + step averaged over stat_every steps at the defaults / (plain
                   fwd+bwd + AdamW step) (targets <= 1.10 diag and rank1, <= 1.25 kfac, shampoo)
  products bound   1 + Σ (d_out² d_a + d_out d_a²) / the layers' own products: K-FAC's (and unblocked
                   Shampoo's) per-step products against the layers' own, the whole step's floor
  diag / AdamW     `model.step()` with "diag" / torch.optim.AdamW(foreach=True).step() (<= 1.1)
  shampoo / pub.   gnfx "shampoo" step / pytorch-optimizer's Shampoo and heavyball's KLShampoo
                   step on the same model, both refreshing every 10 steps (<= 0.8)

The rows-per-step sweep (`--sweep`, also part of the default run): an MLP of width SWEEP_WIDTH
(SWEEP_WIDTH-SWEEP_WIDTH-SWEEP_WIDTH-10) at rows = width x {1/4, ..., 16} per step, batches drawn
from a pool, each preconditioner's whole step (fwd+bwd + step averaged over stat_every steps) over
plain fwd+bwd + AdamW's, as medians of paired ratios, beside its products bound: 1 + the extra
products per step over the layers' own (3 R d_in d_out; 2 for the first layer, whose input
needs no gradient), amortized over stat_every: K-FAC applies S⁻¹ G A⁻¹ every step and its taps add
R (d_in² + d_out²) on statistic steps; Shampoo applies L^{-p} G R^{-p} every step and collects G Gᵀ
and Gᵀ G on statistic steps; rank1's taps form the per-example diagonal (δ²)ᵀ(a²), R d_out d_a, on
statistic steps, and take the batch gradient δᵀa from autograd's ∇W (fisher="empirical", the sweep's: no
loss= given; gnfx.taps.WeightTap), which is among the layers' own products;
diag adds no products (its bound is 1). The refresh's decompositions and the step's elementwise
work are not in the bound. Targets at rows/width >= 4: kfac and shampoo <= 1.25, diag and rank1
<= 1.10.
`--sweep-ratios` picks the rows/width, `--sweep-optimizers` the columns, each
`OPTIMIZER[:key=value,...]` (gnfx.compile's settings, e.g. `shampoo:precondition_frequency=50`); a
column whose refresh interval exceeds stat_every is timed over windows of lcm(stat_every, interval)
steps (`refresh_window`), so that every window holds its refresh; a column with a drift-triggered
refresh (shampoo's refresh_tolerance > 0) over windows of its max_refresh_interval, the longest a
root goes without one. Such a column refreshes less as its factors settle, so `--sweep-warmup`
untimed steps put the timed rounds later in training, and the sweep reports the fraction of root
checks that recomputed a root in the timed rounds (`refreshed`).

Writes `<out>/targets.json` and `<out>/targets.md`, and `<out>/sweep.json` and `<out>/sweep.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import gnfx
from gnfx.taps import WeightTap
from benchmarks.defaults import variant_settings
from benchmarks.models import mlp
from benchmarks.optimizers import OPTIMIZERS
from benchmarks.tasks import char_gpt, digits_cnn, digits_mlp

RESULTS = Path(__file__).parent / "results"
STAT_EVERY = gnfx.COMMON["stat_every"].default
PAIRS = 30  # extra interleaved (plain, instrumented) forward+backward pairs per model
STEP_SAMPLES = 5  # optimizer steps timed per round for a step-only figure (their median)
SWEEP_WIDTH = 256
SWEEP_RATIOS = (0.25, 0.5, 1, 2, 4, 8, 16)  # rows per step / width
SWEEP_POOL = 4  # batches the sweep cycles through
SWEEP_TARGETS = {"diag": 1.10, "rank1": 1.10, "kfac": 1.25, "shampoo": 1.25}  # at rows/width >= 4


def models():
    """(name, model factory, batch, loss) of each model."""
    for task in (digits_mlp(), digits_cnn(), char_gpt()):
        x, y = next(task.batches(0))
        yield task.name, lambda task=task: task.make_model(0), (x, y), task.loss_fn
    for width in (1024, 2048):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, width, generator=g), torch.randint(10, (128,), generator=g)

        def make(width=width):
            torch.manual_seed(0)
            return mlp([width, width, width, 10])
        yield f"mlp{width}", make, (x, y), torch.nn.functional.cross_entropy


# the clock of every timing: wall-clock seconds, or with `--clock cpu` (one thread) the seconds this
# thread ran, which on an oversubscribed machine leave out the time slices other processes took
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]
# where the models and batches live (`--device`); on an accelerator every timing waits for its queue
DEVICE = torch.device("cpu")


def synchronize() -> None:
    """Wait for the work queued on DEVICE (none to wait for on the CPU)."""
    if DEVICE.type != "cpu":
        torch.accelerator.synchronize(DEVICE)


def seconds(fn) -> float:
    synchronize()
    t = clock()
    fn()
    synchronize()
    return clock() - t


def products(compiled, rows: dict) -> dict:
    """Multiply-adds of the blocks of `compiled` (R_b: the rows of block b on a statistic step,
    examples x positions): "layers", the layers' own forward+backward products, 3 R d_in d_out a
    block (z, ∂L/∂W and ∂L/∂a), 2 R d_in d_out for a block reading the model's input (`model_input`:
    the data needs no gradient, and autograd forms none); "statistics", the taps' aᵀa and δᵀδ,
    Σ R (d_in² + d_out²); "rank1_statistics", rank1's taps, the per-example diagonal (δ²)ᵀ(a²),
    Σ R d_out d_a, and the batch gradient δᵀa, R d_out d_a, only for a block whose taps form it: a block of
    `compiled` that reads its weight through a gnfx.taps.WeightTap takes it from autograd's ∇W (rank1 under
    fisher="empirical", as the sweep compiles it without loss=); "preconditioner", one K-FAC step S⁻¹ G A⁻¹,
    Σ d_out² d_a + d_out d_a² with d_a = d_in (+1 for a bias). An embedding's own product is a
    gather (none), its A a count (R d_out² of statistics) and diagonal (d_out² d_in a step)."""
    out = dict.fromkeys(("layers", "statistics", "rank1_statistics", "preconditioner"), 0)
    weight_read = {m.stats.block.name for m in compiled.graph_module.modules() if isinstance(m, WeightTap)}
    for b in compiled.layers:
        r, d_a = rows[b.name], b.d_in + (1 if b.bias else 0)
        if b.kind == "embedding":
            out["statistics"] += r * b.d_out ** 2
            out["preconditioner"] += b.d_out ** 2 * b.d_in
        else:
            out["layers"] += (2 if b.model_input else 3) * r * b.d_in * b.d_out
            out["statistics"] += r * (b.d_in ** 2 + b.d_out ** 2)
            out["rank1_statistics"] += (1 if b.name in weight_read else 2) * r * b.d_out * d_a
            out["preconditioner"] += b.d_out ** 2 * d_a + b.d_out * d_a ** 2
    return out


def statistic_rows(compiled) -> dict:
    """The rows each block's taps saw on the last statistic step (read before the step folds them)."""
    return {name: s._a_rows for name, s in compiled.optimizer.statistics.blocks.items() if s._a_rows}


def measure(make_on_cpu, batch, loss_fn, repeats: int) -> dict:
    x, y = (t.to(DEVICE) for t in batch)

    def make():
        return make_on_cpu().to(DEVICE)

    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=True)
    kfac = gnfx.compile(make(), "kfac", lr=1e-3)

    def fwd_bwd(module):
        return seconds(lambda: loss_fn(module(x), y).backward())

    rows = {}

    def tapped(statistic_step: bool):
        kfac.optimizer.steps = 0 if statistic_step else 1
        t = fwd_bwd(kfac)
        rows.update(statistic_rows(kfac))
        kfac.optimizer.statistics.discard()
        kfac.optimizer.collected = False
        kfac.zero_grad()
        return t

    runs = {name: gnfx.compile(make(), name, lr=1e-4) for name in ("diag", "rank1", "kfac", "shampoo")}
    published = {}
    for key in ("po_shampoo", "hb_kl_shampoo"):
        try:
            published[key] = OPTIMIZERS[key].make(make(), 1e-4)
        except Exception as error:  # noqa: BLE001 - a missing package is reported, not fatal
            published[key] = str(error)

    def whole(compiled):  # stat_every consecutive steps, per step
        def run():
            for _ in range(STAT_EVERY):
                loss_fn(compiled(x), y).backward()
                compiled.step()
                compiled.zero_grad()
        return seconds(run) / STAT_EVERY

    def step_only(step, zero, module, times=STEP_SAMPLES):  # the median of `times` steps
        samples = []
        for _ in range(times):
            loss_fn(module(x), y).backward()
            samples.append(seconds(step))
            zero()
        return statistics.median(samples)

    for c in runs.values():  # untimed: compiling (compile="auto"), and Shampoo's start at step 10
        whole(c)
        whole(c)
    samples = {k: [] for k in ("plain", "nostat", "plain2", "stat", "adamw", *runs, "diag_step", *published)}

    def fwd_bwd_pairs():  # plain before no-stat, plain again before stat
        return {"plain": fwd_bwd(plain), "nostat": tapped(False), "plain2": fwd_bwd(plain), "stat": tapped(True)}

    for i in range(repeats + 1):
        sample = fwd_bwd_pairs()
        sample["adamw"] = step_only(adamw.step, adamw.zero_grad, plain)
        sample.update({name: whole(c) for name, c in runs.items()})
        sample["diag_step"] = step_only(runs["diag"].step, runs["diag"].zero_grad, runs["diag"])
        for key, trainer in published.items():
            if not isinstance(trainer, str):
                # one step a round: theirs take up to seconds at width 2048; they refresh every 10 steps,
                # so for up to 9 rounds these are plain steps, while gnfx's include its amortized refresh
                sample[key] = step_only(trainer.step, trainer.zero_grad, trainer.module, times=1)
        if i:  # the first round warms up the rest
            for k, v in sample.items():
                samples[k].append(v)
    # forward+backward ratios from PAIRS more interleaved pairs: a 2% target needs more samples
    plain_rounds = list(samples["plain"])  # the rounds' own plain forward+backward, before the pairs
    for _ in range(PAIRS):
        for k, v in fwd_bwd_pairs().items():
            samples[k].append(v)

    def ratio(a, b):
        """The median of a / b over paired samples (zip stops at the shorter list)."""
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    base = [p + a for p, a in zip(plain_rounds, samples["adamw"])]  # plain fwd+bwd + AdamW step
    work = products(kfac, rows)
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    row = {
        "plain_ms": 1e3 * med["plain"], "adamw_step_ms": 1e3 * med["adamw"],
        "nostat_ratio": ratio("nostat", "plain"), "stat_ratio": ratio("stat", "plain2"),
        "flop_bound": 1 + work["statistics"] / work["layers"],
        # K-FAC's and Shampoo's products per step (without refresh or AdamW's elementwise work) over the
        # layers' own: the whole step's ratio if all products ran at the same speed
        "apply_flop_bound": 1 + work["preconditioner"] / work["layers"],
        "whole_step": {name: statistics.median(w / b for w, b in zip(samples[name], base)) for name in runs},
        "diag_vs_adamw": ratio("diag_step", "adamw"),
        # shampoo's step alone: its whole step minus the plain forward+backward of the same round
        "shampoo_vs_published": {key: (statistics.median((w - p) / q for w, p, q in
                                                         zip(samples["shampoo"], plain_rounds, samples[key]))
                                       if samples.get(key) else trainer)
                                 for key, trainer in published.items()},
        "compiled_update": {name: c.optimizer.update_function.compiled for name, c in runs.items()},
    }
    row["stat_over_bound"] = row["stat_ratio"] / row["flop_bound"]
    return row


def clock_name() -> str:
    return "wall-clock time" if clock is CLOCKS["wall"] else "CPU time of the thread"


def device_name() -> str:
    """The device the timings ran on, as the tables name it: the CPU's threads, or the accelerator."""
    if DEVICE.type == "cpu":
        return f"{torch.get_num_threads()} threads"
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else str(DEVICE)


def sweep_bounds(compiled, rows: dict) -> dict:
    """The products bound of each preconditioner of the sweep (see the module docstring) on the blocks of
    `compiled` (rank1's counts the batch gradients its taps form: `products`)."""
    work = products(compiled, rows)
    layers = work["layers"]
    return {"diag": 1.0, "rank1": 1 + work["rank1_statistics"] / STAT_EVERY / layers,
            "kfac": 1 + (work["preconditioner"] + work["statistics"] / STAT_EVERY) / layers,
            "shampoo": 1 + work["preconditioner"] * (1 + 1 / STAT_EVERY) / layers}


def refresh_window(compiled) -> int:
    """Steps a timing window of `compiled` spans so that it holds whole statistic and refresh periods:
    the least common multiple of stat_every and each preconditioner's refresh interval (inv_every,
    precondition_frequency, and under a drift-triggered refresh max_refresh_interval, the longest
    between two refreshes of a root). A window of stat_every steps would, for an interval above it,
    leave the refresh out of most windows and their median."""
    window = STAT_EVERY
    for pre in compiled.optimizer.preconditioners:
        keys = ["inv_every", "precondition_frequency"] + ["max_refresh_interval"] * (pre.hp.get("refresh_tolerance", 0) > 0)
        for key in keys:
            if isinstance(pre.hp.get(key), int):
                window = math.lcm(window, pre.hp[key])
    return window


def root_checks(compiled) -> tuple[int, int]:
    """(roots recomputed, roots kept) so far by the drift-triggered refreshes of `compiled` (the
    "refreshes" and "skipped" counters its preconditioners keep; (0, 0) without them)."""
    counts = [0, 0]
    for pre in compiled.optimizer.curvature:
        for state in pre.states().values():
            for i, key in enumerate(("refreshes", "skipped")):
                counts[i] += int(state[key].sum()) if key in state else 0
    return counts[0], counts[1]


def sweep_variant(variant: str) -> tuple[str, dict]:
    """(optimizer, settings) of a sweep variant `OPTIMIZER[:key=value,...]` (benchmarks/defaults.py's form)."""
    name, settings = variant_settings(variant)
    if name not in SWEEP_TARGETS:
        raise SystemExit(f"--sweep-optimizers: {variant!r} is not one of {tuple(SWEEP_TARGETS)}[:key=value,...]")
    return name, settings


def sweep_point(rows: int, rounds: int, variants=tuple(SWEEP_TARGETS), warmup: int = 0,
                width: int | None = None) -> dict:
    """Whole-step ratios to AdamW at `rows` rows per step on the sweep's MLP (module docstring) of
    `width` (SWEEP_WIDTH unless given), for each of `variants` (`OPTIMIZER[:key=value,...]`,
    gnfx.compile's settings beside lr), timed after `warmup` untimed steps of each."""
    width = width or SWEEP_WIDTH
    g = torch.Generator().manual_seed(rows)
    pool = [(torch.randn(rows, width, generator=g).to(DEVICE), torch.randint(10, (rows,), generator=g).to(DEVICE))
            for _ in range(SWEEP_POOL)]
    loss_fn = torch.nn.functional.cross_entropy

    def make():
        torch.manual_seed(0)
        return mlp([width, width, width, 10]).to(DEVICE)

    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-4, foreach=True)
    runs = {}
    for variant in variants:
        name, settings = sweep_variant(variant)
        runs[variant] = gnfx.compile(make(), name, lr=1e-4, **settings)

    def whole(module, step, zero, steps=STAT_EVERY):  # `steps` consecutive steps, per step
        def run():
            for i in range(steps):
                x, y = pool[i % SWEEP_POOL]
                loss_fn(module(x), y).backward()
                step()
                zero()
        return seconds(run) / steps

    # the rows the taps see, read from a K-FAC model's statistic step before it folds them
    probe = gnfx.compile(make(), "kfac", lr=1e-4)
    x, y = pool[0]
    loss_fn(probe(x), y).backward()
    stat_rows = statistic_rows(probe)
    samples = {k: [] for k in ("adamw", *runs)}
    windows = {name: refresh_window(c) for name, c in runs.items()}
    for c in runs.values():
        for i in range(warmup):
            x, y = pool[i % SWEEP_POOL]
            loss_fn(c(x), y).backward()
            c.step()
            c.zero_grad()
    checks = {}
    for r in range(rounds + 2):
        if r == 2:
            checks = {name: root_checks(c) for name, c in runs.items()}  # two untimed rounds: warm-up, and Shampoo's start at step 10
        sample = {"adamw": whole(plain, adamw.step, adamw.zero_grad)}
        for name, c in runs.items():
            if r < 2 and windows[name] > STAT_EVERY:  # warm-up and start in STAT_EVERY steps, as the others
                sample[name] = whole(c, c.step, c.zero_grad)
                continue
            sample[name] = whole(c, c.step, c.zero_grad, windows[name])
        if r >= 2:
            for k, v in sample.items():
                samples[k].append(v)
    bounds = {n: sweep_bounds(c, stat_rows)[sweep_variant(n)[0]] for n, c in runs.items()}
    refreshed = {}
    for name, c in runs.items():
        done, kept = (now - before for now, before in zip(root_checks(c), checks[name]))
        if done + kept:
            refreshed[name] = done / (done + kept)
    return {"rows": rows, "width": width, "rows_per_width": rows / width, "adamw_ms": 1e3 * statistics.median(samples["adamw"]),
            "ratio": {n: statistics.median(w / a for w, a in zip(samples[n], samples["adamw"])) for n in runs},
            "bound": bounds, "refreshed": refreshed}


def sweep(rounds: int, ratios=None, variants=None, warmup: int = 0, width: int | None = None) -> list[dict]:
    """sweep_point at rows = width (default SWEEP_WIDTH) x each of `ratios` (default SWEEP_RATIOS) for
    `variants` (default every preconditioner of SWEEP_TARGETS at its defaults), after `warmup` untimed steps."""
    width = width or SWEEP_WIDTH
    points = []
    for ratio in ratios or SWEEP_RATIOS:
        points.append(sweep_point(round(ratio * width), rounds, variants or tuple(SWEEP_TARGETS), warmup, width))
        print("sweep", json.dumps(points[-1]), flush=True)
    return points


def sweep_markdown(points: list[dict], rounds: int, command: str) -> str:
    names, width = list(points[0]["ratio"]), points[0]["width"]
    lines = ["# Whole step against AdamW as the rows per step grow", "",
             f"torch {torch.__version__}, {device_name()}, {clock_name()}; "
             f"MLP {width}-{width}-{width}-10, batches from a pool of {SWEEP_POOL}; "
             f"each cell: the median over {rounds} interleaved rounds of (fwd+bwd + step, averaged over "
             f"stat_every={STAT_EVERY} steps, or lcm(stat_every, interval) for a column that refreshes less often, "
             "or max_refresh_interval for a drift-triggered refresh, with the share of roots it recomputed) "
             "/ (plain fwd+bwd + AdamW step), then the products bound in "
             "parentheses (benchmarks/targets.py's docstring). "
             "Targets at rows/width ≥ 4: " + ", ".join(f"{n} ≤ {t:.2f}" for n, t in SWEEP_TARGETS.items()) +
             "; ✓ met, ✗ missed, then the room the target leaves beside the products, target − bound (a fraction "
             "of AdamW's whole step, for everything that is not a product: the refresh, the tail, dispatch; "
             "`python -m benchmarks.profile --parts 4` splits it), or (bound) where the bound itself is above the "
             "target. gnfx defaults unless a column names settings "
             "(compile='auto': eager on a CPU). `" + command + "`.", "",
             "| rows | rows/width | AdamW whole step ms | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for p in points:
        cells = []
        for n in names:
            ratio, bound, target = p["ratio"][n], p["bound"][n], SWEEP_TARGETS[sweep_variant(n)[0]]
            mark = "" if p["rows_per_width"] < 4 else " ✓" if ratio <= target else (
                " ✗ (bound)" if bound > target else f" ✗ room {target - bound:.3f}")
            share = p.get("refreshed", {}).get(n)  # roots recomputed / root checks, drift-triggered refreshes
            cells.append(f"{ratio:.2f} ({bound:.2f}){mark}" + ("" if share is None else f", {share:.0%} of roots refreshed"))
        lines.append(f"| {p['rows']} | {p['rows_per_width']:g} | {p['adamw_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: dict, repeats: int) -> str:
    lines = ["# gnfx performance targets", "",
             f"torch {torch.__version__}, {device_name()}, {clock_name()}; "
             f"medians of paired ratios over {repeats} "
             f"interleaved rounds (forward+backward: {repeats + PAIRS} pairs); gnfx defaults (stat_every={STAT_EVERY}, "
             "compile='auto'). Targets: no-stat ≤ 1.02, stat/bound ≤ 1.15, whole step ≤ 1.10 (diag, rank1) and "
             "≤ 1.25 (kfac, shampoo), diag/AdamW ≤ 1.1, shampoo/published ≤ 0.8. \"products bound\": 1 + K-FAC's "
             "(and Shampoo's) per-step products 2Σ(d_out² d_a + d_out d_a²) over the layers' own 6Σ R d_in d_out, "
             "the whole step's ratio if every product ran at the layers' speed, before refresh and elementwise work. "
             "Where the time goes: profile.md; the targets discussed: performance.md.", "",
             "| model | plain fwd+bwd ms | no-stat fwd+bwd | stat fwd+bwd (bound) | stat / bound "
             "| whole step diag | rank1 | kfac | shampoo | products bound | diag / AdamW | shampoo / po_shampoo "
             "| shampoo / hb_kl_shampoo |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        w, p = r["whole_step"], r["shampoo_vs_published"]
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "n/a"  # noqa: E731
        lines.append(f"| {name} | {r['plain_ms']:.2f} | {r['nostat_ratio']:.3f} | {r['stat_ratio']:.2f} "
                     f"({r['flop_bound']:.2f}) | {r['stat_over_bound']:.2f} | {w['diag']:.2f} | {w['rank1']:.2f} "
                     f"| {w['kfac']:.2f} | {w['shampoo']:.2f} | {r['apply_flop_bound']:.2f} | {r['diag_vs_adamw']:.2f} "
                     f"| {fmt(p.get('po_shampoo'))} | {fmt(p.get('hb_kl_shampoo'))} |")
    return "\n".join(lines) + "\n"


def add_timing_arguments(parser) -> None:
    """--threads and --clock, shared by the benchmarks that time steps (this file, compile_time.py)."""
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on an oversubscribed machine, "
                        "where two-thread kernels wait for each other's time slices)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="'cpu': this thread's CPU seconds (needs --threads 1), for a shared machine")
    parser.add_argument("--device", default="cpu", help="where the models run (e.g. cuda); timings wait for its queue")


def use_timing_arguments(parser, args) -> None:
    """Set this module's clock and torch's threads from `add_timing_arguments`' options."""
    global clock, DEVICE
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: pass --threads 1")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures this thread, not an accelerator: pass --clock wall")
    clock = CLOCKS[args.clock]
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=None, help="a subset of: mlp (digits), cnn, gpt, mlp1024, mlp2048")
    parser.add_argument("--sweep", action="store_true", help="only the rows-per-step sweep")
    parser.add_argument("--sweep-rounds", type=int, default=5)
    parser.add_argument("--sweep-width", type=int, default=None, help=f"the sweep MLP's width (default {SWEEP_WIDTH})")
    parser.add_argument("--sweep-ratios", type=float, nargs="+", default=None,
                        help=f"rows per step / width (default {' '.join(f'{r:g}' for r in SWEEP_RATIOS)})")
    parser.add_argument("--sweep-optimizers", nargs="+", default=None,
                        help="the sweep's columns: OPTIMIZER[:key=value,...] with OPTIMIZER one of "
                             f"{', '.join(SWEEP_TARGETS)} (e.g. shampoo:precondition_frequency=50)")
    parser.add_argument("--sweep-warmup", type=int, default=0,
                        help="untimed steps of every sweep column before its rounds (their two untimed rounds aside)")
    parser.add_argument("--no-sweep", action="store_true", help="only the models' table")
    add_timing_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    use_timing_arguments(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    if not args.sweep:
        for name, make, batch, loss_fn in models():
            if args.models and not any(m in name for m in args.models):
                continue
            rows[name] = measure(make, batch, loss_fn, args.repeats)
            print(name, json.dumps(rows[name]), flush=True)
        (args.out / "targets.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "targets.md").write_text(markdown(rows, args.repeats))
    if not args.no_sweep:
        points = sweep(args.sweep_rounds, args.sweep_ratios, args.sweep_optimizers, args.sweep_warmup, args.sweep_width)
        (args.out / "sweep.json").write_text(json.dumps(points, indent=1) + "\n")
        command = " ".join(["python -m benchmarks.targets", *(sys.argv[1:] if argv is None else argv)])
        (args.out / "sweep.md").write_text(sweep_markdown(points, args.sweep_rounds, command))
        rows["sweep"] = points
    return rows


if __name__ == "__main__":
    main()
