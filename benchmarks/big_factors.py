"""K-FAC's whole step on a ResNet-18 or a VGG-11 against AdamW's, by max_factor and cost_rows:
`python -m benchmarks.big_factors [--model vgg11_bn] [--cost-rows 8]`.

ResNet-18 for 32x32 images (benchmarks/models.py `resnet18`: 64-128-256-512 channels, BatchNorm)
at batch 32; or at batch 8 a look-alike of torchvision's vgg11_bn for 32x32 images (`vgg11_bn`: its
classifier Linear(25088, 4096), Linear(4096, 4096) sees one row per example), or torchvision's own
(`torchvision_vgg11_bn`, where torchvision is importable). In one process, AdamW and K-FAC at each
max_factor and each `--cost-rows` (the rows per call site the plan's cost model assumes, which bound
each block's factors: gnfx.preconditioners.kfac's factor_bound; 'default': not passed, so that the bounds
are planned again at the rows of the first statistic forward, gnfx.optimizer's bound_factors_at_rows). The forward+backward
takes seconds on this project's 2 shared cores, so
instead of timing whole windows of stat_every steps each optimizer takes, per round, one statistic
step (for K-FAC also a refresh: its step counter is set to a multiple of stat_every = inv_every)
and `--plain` plain steps, the forward+backward and the `step()` timed apart; AdamW and K-FAC at
each max_factor take turns, after one untimed (plain) warm-up step each. K-FAC's whole step is the window
average `(statistic step + (stat_every - 1) plain steps) / stat_every` with each the median over
rounds, AdamW's the median of its steps; the ratio is that of these medians. The paired ratio is the
median over rounds of each round's window average over AdamW's step of the same round (the samples
closest in time, so the least moved by the machine's load). max_factor=0 keeps every factor whole:
K-FAC as it was before factors were blocked. The cost model's amortized FLOPs of the optimizer
(gnfx.cost at the batch's rows, relative to an AdamW step) are printed beside the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gnfx
from benchmarks import targets
from benchmarks.models import resnet18, vgg11_bn
from benchmarks.torchvision_models import torchvision_or_exit
from benchmarks.targets import RESULTS, STAT_EVERY, add_timing_arguments, use_timing_arguments
from gnfx.preconditioners.kfac import MAX_FACTOR


def timed_step(model, step, zero, x, y) -> tuple[float, float]:
    """Seconds of one forward+backward and of the optimizer step after it."""
    fwd_bwd = targets.seconds(lambda: F.cross_entropy(model(x), y).backward())
    seconds = targets.seconds(step)
    zero()
    return fwd_bwd, seconds


# torchvision_vgg11_bn: torchvision's own (not a dependency: benchmarks.torchvision_models.torchvision_or_exit)
MODELS = ("resnet18", "vgg11_bn", "torchvision_vgg11_bn")


def build(name: str) -> torch.nn.Module:
    """A fresh model `name` of MODELS with 10 classes, seeded alike, on the benchmarks' device."""
    torch.manual_seed(0)
    if name == "torchvision_vgg11_bn":
        return torchvision_or_exit().get_model("vgg11_bn", num_classes=10).to(targets.DEVICE)
    return (resnet18() if name == "resnet18" else vgg11_bn()).to(targets.DEVICE)


def kfac_runners(name: str, max_factors, cost_rows):
    """(label, gnfx.compile(model, "kfac", ...)) for each max_factor and each cost_rows (None: gnfx's), one
    model at a time."""
    for m in max_factors:
        for rows in cost_rows:
            given = {} if rows is None else {"cost_rows": rows}
            yield (f"kfac max_factor={m}" + "".join(f" {k}={v}" for k, v in given.items()),
                   gnfx.compile(build(name), "kfac", lr=1e-3, max_factor=m, **given))


def run(model_name: str, max_factors, cost_rows, batch: int, rounds: int, plain: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(10, (batch,), generator=g)
    x, y = x.to(targets.DEVICE), y.to(targets.DEVICE)
    model = build(model_name)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    runners = {"adamw": (model, adamw.step, adamw.zero_grad, None)}
    for label, c in kfac_runners(model_name, max_factors, cost_rows):
        runners[label] = (c, c.step, c.zero_grad, c.optimizer)
    samples = {k: {"stat": [], "plain": []} for k in runners}
    for r in range(rounds + 1):
        for name, (model, step, zero, opt) in runners.items():
            for i in range(1 + plain if r else 1):  # round 0: one untimed warm-up step
                if opt is not None and i == 0:  # warm-up: a plain step; then a statistic step that refreshes
                    opt.steps = STAT_EVERY * r if r else 1  # (inv_every = stat_every)
                t = timed_step(model, step, zero, x, y)
                if r:
                    samples[name]["stat" if i == 0 else "plain"].append(t)
            print(f"round {r} {name}: {t[0]:.2f} s forward+backward, {t[1]:.3f} s step", flush=True)
    out = {"model": model_name, "batch": batch, "rounds": rounds, "plain_steps": plain, "device": targets.device_name(),
           "stat_every": STAT_EVERY, "uptime": os.popen("uptime").read().strip(), "rows": {}}
    per_round = {}  # label -> the whole step of each round
    for label, (model, *_, opt) in runners.items():
        median = {kind: [statistics.median(t[j] for t in v) for j in (0, 1)] for kind, v in samples[label].items()}
        # each round's statistic step and plain steps (forward+backward and step together)
        rounds_of = [(sum(samples[label]["stat"][r]), [sum(t) for t in samples[label]["plain"][r * plain:(r + 1) * plain]])
                     for r in range(rounds)]
        if opt is None:  # AdamW: every step alike
            whole = statistics.median(sum(t) for v in samples[label].values() for t in v)
            per_round[label] = [statistics.mean([stat, *plains]) for stat, plains in rounds_of]
        else:
            whole = (sum(median["stat"]) + (STAT_EVERY - 1) * sum(median["plain"])) / STAT_EVERY
            per_round[label] = [(stat + (STAT_EVERY - 1) * statistics.mean(plains)) / STAT_EVERY
                                for stat, plains in rounds_of]
        out["rows"][label] = {"whole_step_s": whole, "stat_fwd_bwd_s": median["stat"][0], "stat_step_s": median["stat"][1],
                              "plain_fwd_bwd_s": median["plain"][0], "plain_step_s": median["plain"][1]}
        if opt is not None:
            out["rows"][label]["flops_vs_adamw"] = model.cost(batch_size=batch).flops_ratio
            out["rows"][label]["blocks"] = repr(model.layers)
    for label, row in out["rows"].items():
        row["ratio_vs_adamw"] = row["whole_step_s"] / out["rows"]["adamw"]["whole_step_s"]
        row["paired_ratio_vs_adamw"] = statistics.median(k / a for k, a in zip(per_round[label], per_round["adamw"]))
    return out


def parts(name: str, max_factors, cost_rows, batch: int, repeats: int) -> dict:
    """K-FAC's optimizer work alone, by max_factor: the plain step (the preconditioned product and the
    tail) and the refresh, each the median of `repeats` calls on the gradients and statistics of one
    statistic step, and the statistic step's forward+backward (the taps) against a plain one."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(10, (batch,), generator=g)
    x, y = x.to(targets.DEVICE), y.to(targets.DEVICE)
    out = {}
    for label, c in kfac_runners(name, max_factors, cost_rows):
        kfac, opt = c.optimizer.curvature[0], c.optimizer
        opt.steps = 0
        stat_fwd_bwd = targets.seconds(lambda: F.cross_entropy(c(x), y).backward())
        c.step()  # folds the statistics and refreshes
        refresh = statistics.median(targets.seconds(lambda: kfac.refresh(opt.statistics, opt.comm))
                                    for _ in range(repeats))
        c.zero_grad()
        opt.steps = 1
        plain_fwd_bwd = targets.seconds(lambda: F.cross_entropy(c(x), y).backward())
        steps = []
        for _ in range(repeats):
            opt.steps = 1  # a plain step each time, on the same gradients
            steps.append(targets.seconds(c.step))
        out[label] = {"plain_fwd_bwd_s": plain_fwd_bwd, "stat_fwd_bwd_s": stat_fwd_bwd,
                      "plain_step_s": statistics.median(steps), "refresh_s": refresh}
        print(label, out[label], flush=True)
    return out


TITLES = {"resnet18": "ResNet-18", "vgg11_bn": "vgg11_bn (look-alike)", "torchvision_vgg11_bn": "torchvision's vgg11_bn"}


def output_name(name: str) -> str:
    """The results' file stem: big_factors for the ResNet-18, big_factors_<model> for another."""
    return "big_factors" if name == "resnet18" else f"big_factors_{name}"


def parts_markdown(model_name: str, rows: dict, command: str) -> str:
    lines = [f"`{command}`: K-FAC's parts on {TITLES[model_name]} (32x32 inputs), medians; `uptime` at the end: "
             f"{os.popen('uptime').read().strip()}", "",
             "| optimizer | plain step (s) | refresh (s) | statistic fwd+bwd / plain fwd+bwd (s) |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['plain_step_s']:.3f} | {row['refresh_s']:.2f} | "
                     f"{row['stat_fwd_bwd_s']:.2f} / {row['plain_fwd_bwd_s']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict, command: str) -> str:
    lines = [f"`{command}`: {TITLES[result['model']]} (32x32 inputs, batch {result['batch']}), {result['device']}, "
             f"{result['rounds']} rounds of one statistic (and refresh) step and {result['plain_steps']} plain steps "
             f"per optimizer; `uptime` at the end: {result['uptime']}", "",
             "| optimizer | whole step (s) | x AdamW | paired x AdamW | plain fwd+bwd / step (s) | "
             "statistic fwd+bwd / step (s) | cost model: optimizer FLOPs x AdamW step |", "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        flops = f"{row['flops_vs_adamw']:.0f}" if "flops_vs_adamw" in row else "1"
        lines.append(f"| {name} | {row['whole_step_s']:.2f} | {row['ratio_vs_adamw']:.2f} | "
                     f"{row['paired_ratio_vs_adamw']:.2f} | "
                     f"{row['plain_fwd_bwd_s']:.2f} / {row['plain_step_s']:.3f} | "
                     f"{row['stat_fwd_bwd_s']:.2f} / {row['stat_step_s']:.2f} | {flops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-factors", type=int, nargs="+", default=[0, 1024, MAX_FACTOR],
                        help="K-FAC's max_factor values to time (0: every factor whole)")
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--cost-rows", type=lambda v: None if v == "default" else int(v), nargs="+", default=[None],
                        help="K-FAC's cost_rows values to time ('default', or none given: cost_rows not passed, "
                             "the factor bounds planned at the rows of the first statistic forward)")
    parser.add_argument("--batch", type=int, help="default: 32 for resnet18, 8 for the VGGs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain", type=int, default=2, help="plain steps per optimizer and round")
    add_timing_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", action="store_true", help="only K-FAC's parts (plain step, refresh, taps)")
    parser.add_argument("--repeats", type=int, default=3, help="--parts: calls timed per part")
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.model == "resnet18" else 8)
    use_timing_arguments(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python -m benchmarks.big_factors " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.parts:
        result = parts(args.model, args.max_factors, args.cost_rows, args.batch, args.repeats)
        stem = output_name(args.model) + "_parts"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(parts_markdown(args.model, result, command))
        print(parts_markdown(args.model, result, command))
        return result
    result = run(args.model, args.max_factors, args.cost_rows, args.batch, args.rounds, args.plain)
    stem = output_name(args.model)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result, command))
    print(markdown(result, command))
    return result


if __name__ == "__main__":
    main()
