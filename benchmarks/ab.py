"""Before and after in one process: `python -m benchmarks.ab --baseline REV [--ratios 4] [--rounds 9]`.

The working tree's gnfx and the gnfx of git revision REV (its `gnfx/` and `passes/` extracted with `git archive`)
are imported side by side, each as its own set of `gnfx.*` modules, which `using` puts into
sys.modules while that tree's model runs (so that imports at call time resolve within its own
tree). On the sweep's MLP (benchmarks/targets.py: SWEEP_WIDTH-SWEEP_WIDTH-SWEEP_WIDTH-10 at each of
`--ratios` rows per width, batches from a pool) and on op_count's digits-sized MLP (64-128-128-10,
128 rows), each round times, per preconditioner, a window of whole steps (fwd+bwd + step, the
window `targets.refresh_window` gives, so that it holds its statistic and refresh steps) of AdamW
(foreach), then of the baseline and of the working tree in an order that alternates by round, all
on the same batches. Printed per model and preconditioner: each tree's whole step over AdamW's of
the same round, and its `model.step()` alone over AdamW's `step()` (the part the update's code
decides; less noisy), each as median and range over the rounds and as the median of the paired
after / before ratios, the minor page faults per whole step of AdamW and each tree (memory the C
allocator gave back to the system and takes again: a cost that shows in the next forward+backward),
and each tree's tensor operations per plain step (benchmarks/op_count.py). Use `--threads 1 --clock
cpu` on a shared machine (benchmarks/targets.py).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import op_count, targets
from benchmarks.models import mlp

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ([64, 128, 128, 10], 128)  # op_count's model: sizes, rows per step
PARTS = ("whole", "step")  # the whole step (fwd+bwd + step) and the step alone, each over AdamW's


def _gnfx_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "gnfx" or k.startswith("gnfx.")}


@contextlib.contextmanager
def using(tree: dict):
    """sys.modules holds `tree`'s gnfx modules (from `load_tree`, or `_gnfx_modules()` of the working
    tree) inside the block, and the previous ones after it."""
    previous = _gnfx_modules()
    for k in previous:
        del sys.modules[k]
    sys.modules.update(tree)
    try:
        yield tree.get("gnfx")
    finally:
        for k in _gnfx_modules():
            del sys.modules[k]
        sys.modules.update(previous)


def load_tree(rev: str) -> dict:
    """The gnfx modules of git revision `rev`, imported from a temporary copy of its `gnfx/` and `passes/` (kept until
    the process exits, for the modules it imports later)."""
    folder = Path(tempfile.mkdtemp(prefix="gnfx-ab-"))
    atexit.register(shutil.rmtree, folder, True)
    # gnfx/passes is a link to the top-level passes/, which the revision's gnfx imports with it
    linked = subprocess.run(["git", "ls-tree", "--name-only", rev, "passes"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    archive = subprocess.run(["git", "archive", rev, "gnfx", *linked], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    with using({}):
        sys.path.insert(0, str(folder))
        try:
            importlib.import_module("gnfx")
            return _gnfx_modules()
        finally:
            sys.path.remove(str(folder))


def page_faults() -> int:
    """Minor page faults of this process so far (memory the allocator took back from the system)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def whole_steps(module, step, zero, pool, steps: int) -> tuple[float, float, float]:
    """Seconds per whole step (fwd+bwd, step, zero_grad) and of the step alone, and page faults per
    whole step, over `steps` steps on the batches of `pool`."""
    whole = alone = 0.0
    faults = page_faults()
    for i in range(steps):
        x, y = pool[i % len(pool)]
        whole += targets.seconds(lambda: torch.nn.functional.cross_entropy(module(x), y).backward())
        t = targets.seconds(step)
        whole += t + targets.seconds(zero)
        alone += t
    return whole / steps, alone / steps, (page_faults() - faults) / steps


def compare(trees: dict, sizes: list[int], rows: int, names: list[str], rounds: int) -> dict:
    """Whole-step ratios to AdamW of each tree (`trees`: label -> gnfx modules) and each preconditioner
    of `names` on mlp(sizes) at `rows` rows per step (module docstring)."""
    g = torch.Generator().manual_seed(rows)
    pool = [(torch.randn(rows, sizes[0], generator=g), torch.randint(sizes[-1], (rows,), generator=g))
            for _ in range(targets.SWEEP_POOL)]

    def make():
        torch.manual_seed(0)
        return mlp(sizes)

    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-4, foreach=True)
    runs = {}
    for label, tree in trees.items():
        with using(tree) as gnfx:
            runs[label] = {name: gnfx.compile(make(), name, lr=1e-4) for name in names}
    result = {}
    for name in names:
        window = targets.refresh_window(runs["after"][name])
        ratios = {(label, part): [] for label in trees for part in PARTS}
        faults = {label: [] for label in ("adamw", *trees)}
        for r in range(rounds + 2):  # two untimed rounds: the first steps, and Shampoo's start at step 10
            a = whole_steps(plain, adamw.step, adamw.zero_grad, pool, window)
            for label in (list(trees) if r % 2 else list(trees)[::-1]):
                c = runs[label][name]
                with using(trees[label]):
                    t = whole_steps(c, c.step, c.zero_grad, pool, window)
                if r >= 2:
                    for part, mine, adamw_s in zip(PARTS, t, a):
                        ratios[label, part].append(mine / adamw_s)
                    faults[label].append(t[2])
            if r >= 2:
                faults["adamw"].append(a[2])
        result[name] = {part: {
            **{label: {"median": statistics.median(v), "min": min(v), "max": max(v)}
               for (label, p), v in ratios.items() if p == part},
            "after / before": statistics.median(b / a for a, b in zip(ratios["before", part], ratios["after", part]))}
            for part in PARTS}
        result[name]["page faults per step"] = {label: statistics.median(v) for label, v in faults.items()}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--ratios", type=float, nargs="+", default=[4.0], help="rows per step / width of the sweep's MLP")
    parser.add_argument("--digits", action=argparse.BooleanOptionalAction, default=True,
                        help="also op_count's digits-sized MLP")
    parser.add_argument("--optimizers", nargs="+", default=["rank1", "kfac", "shampoo"])
    parser.add_argument("--rounds", type=int, default=9)
    targets.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    targets.use_timing_arguments(parser, args)
    trees = {"before": load_tree(args.baseline), "after": _gnfx_modules()}
    out = {"baseline": args.baseline, "operations": {}}
    for label, tree in trees.items():
        with using(tree) as gnfx:
            out["operations"][label] = {n: op_count.count(n, gnfx.compile) for n in args.optimizers}
    print("operations per plain step:", json.dumps(out["operations"]), flush=True)
    models = [(f"mlp {targets.SWEEP_WIDTH} rows/width {r:g}", [targets.SWEEP_WIDTH] * 3 + [10],
               round(r * targets.SWEEP_WIDTH)) for r in args.ratios]
    models += [("digits-sized mlp", *DIGITS)] if args.digits else []
    for label, sizes, rows in models:
        out[label] = compare(trees, sizes, rows, args.optimizers, args.rounds)
        for name, parts in out[label].items():
            print(f"{label:26s} {name:8s} page faults per whole step (medians): "
                  + json.dumps(parts["page faults per step"]), flush=True)
            for part in PARTS:
                r = parts[part]
                print(f"{label:26s} {name:8s} {part:5s} " + "  ".join(
                    f"{t} {r[t]['median']:.3f} ({r[t]['min']:.3f}-{r[t]['max']:.3f})" for t in trees)
                    + f"  after/before {r['after / before']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
