"""Composed models trained at gnfx's defaults in float32: exceptions, non-finite values, and whether the loss fell.

Draws recipes of tests/test_composed_models.py (hypothesis, `--examples` draws, derandomized unless `--random`)
and trains each with every variant of VARIANTS by composed.trained_at_defaults (property e there): the model cast
to float32, gnfx.compile(model, **VARIANTS[name], loss=<the recipe's loss, cross_entropy when it has none>,
capture=<the recipe's>), no lr, what a user gets who names only the optimizer and the loss (the recipe's own
optimizer, lr and step are not used); `--steps` steps on the recipe's first batch (2-3 examples, random labels
or mse targets), which the model can fit, and that batch's loss before and after. Per variant it counts the runs
that raised (by exception and first line), took a non-finite loss or left a non-finite parameter, or ended with
the batch's loss above its start (for a model that draws dropout masks, the mean over composed.MASKS masks; of
the rises, how many such models); prints one line per failure, then a markdown table.

With `--wide`, as a user trains: recipes of composed.WIDE sizes (widths 16-64, batches of 16-64 examples, up to 8
tokens, vocabularies of 16-64 ids, 2-10 classes), each step on a batch drawn afresh from a fixed training set whose
targets a teacher gives (composed.teacher_data: the recipe's model from another seed), and the loss before and
after measured on a held-out set in eval mode (composed.trained_at_defaults with held_out). Each recipe is also
trained by torch.optim.AdamW at lr 1e-3 on the same batches, the reference: the table adds the median over
recipes of the variant's final held-out loss over AdamW's, and how many ended below AdamW's (reported, no gate).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.defaults_fuzz --examples 300 --steps 30
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.defaults_fuzz --wide --examples 100 --steps 150
"""
from __future__ import annotations

import argparse
import collections
import math
import pathlib
import sys
import time

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_composed_models as composed  # noqa: E402

# name: the options of gnfx.compile beside optimizer=, loss= and capture= (no lr: the defaults)
VARIANTS = {
    "kfac": {"optimizer": "kfac"},
    "ekfac": {"optimizer": "ekfac"},
    "rank1": {"optimizer": "rank1"},
    "rank1:quadratic": {"optimizer": "rank1", "step": "quadratic"},
    "shampoo": {"optimizer": "shampoo"},
    "soap": {"optimizer": "soap"},
    "diag": {"optimizer": "diag"},
    "diag:quadratic": {"optimizer": "diag", "step": "quadratic"},
    "auto": {"optimizer": "auto"},
}


def train(recipe, features: int, options: dict | None, steps: int, wide: bool) -> tuple[str | None, float, float]:
    """(the failure or None, loss before, loss after) of composed.trained_at_defaults (held out if `wide`;
    options None: AdamW); a failure is "raised TYPE: first line" or "non-finite loss at step t" / "non-finite
    parameter NAME"."""
    try:
        return None, *composed.trained_at_defaults(recipe, features, options, steps, held_out=wide)
    except AssertionError as error:
        if str(error).startswith("non-finite"):
            return str(error), math.nan, math.nan
        raise
    except Exception as error:  # noqa: BLE001 (every failure is a finding, counted)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return f"raised {type(error).__name__}: {first}", math.nan, math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--random", action="store_true", help="new recipes on each run")
    parser.add_argument("--seed", type=int, help="the recipes of this hypothesis seed, not the derandomized ones")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--wide", action="store_true", help="realistic sizes, fresh batches, a held-out loss, AdamW")
    args = parser.parse_args(argv)
    runs, failures, rose, ratios = collections.Counter(), collections.defaultdict(collections.Counter), \
        collections.defaultdict(list), collections.defaultdict(list)
    to_adamw = collections.defaultdict(list)  # --wide: the variant's held-out loss after over AdamW's
    start, recipes = time.perf_counter(), [0]

    @settings(max_examples=args.examples, derandomize=not (args.random or args.seed is not None), deadline=None,
              database=None, suppress_health_check=list(HealthCheck))
    @given(composed.recipes(composed.WIDE if args.wide else composed.TINY))
    def sweep(drawn):
        recipe, features = drawn
        recipes[0] += 1
        if recipes[0] % 25 == 0:
            print(f"{recipes[0]} recipes, {time.perf_counter() - start:.0f} s", flush=True)
        adamw = math.nan
        if args.wide:
            _, start_loss, adamw = train(recipe, features, None, args.steps, True)
            dropout = " (dropout)" if composed.drawing_random_numbers(recipe) else ""
            print(f"recipe {recipes[0]}{dropout}: held-out {start_loss:.4g}, AdamW after {adamw:.4g}", flush=True)
        for name in args.variants:
            failure, before, after = train(recipe, features, VARIANTS[name], args.steps, args.wide)
            runs[name] += 1
            if failure is not None:
                failures[name][failure.split(":")[0] if failure.startswith("non-finite") else failure] += 1
                print(f"FAIL {name}: {failure}\n    {recipe!r}, {features}", flush=True)
                continue
            ratios[name].append(after / before if before > 0 else math.nan)
            to_adamw[name].append(after / adamw if adamw > 0 else math.nan)
            if args.wide:
                print(f"    {name}: {after:.4g} ({to_adamw[name][-1]:.3g} x AdamW's)", flush=True)
            if after > before:
                dropout = composed.drawing_random_numbers(recipe)
                rose[name].append(dropout)
                print(f"ROSE {name}{' (dropout)' if dropout else ''}: {before:.4g} -> {after:.4g}\n"
                      f"    {recipe!r}, {features}", flush=True)

    (sweep if args.seed is None else seed(args.seed)(sweep))()
    print(f"\n{recipes[0]} recipes, {args.steps} steps, {time.perf_counter() - start:.0f} s\n")
    wide = " median after/AdamW's | below AdamW |" if args.wide else ""
    print(f"| variant | runs | raised | non-finite | loss rose (with dropout) | median after/before |{wide}")
    print("|---|---|---|---|---|---|" + "---|---|" * args.wide)
    for name in args.variants:
        raised = sum(n for f, n in failures[name].items() if f.startswith("raised"))
        finite = sum(n for f, n in failures[name].items() if f.startswith("non-finite"))
        against = f" {median(to_adamw[name]):.3g} | {sum(r < 1 for r in to_adamw[name])} |" if args.wide else ""
        print(f"| {name} | {runs[name]} | {raised} | {finite} | {len(rose[name])} ({sum(rose[name])}) | "
              f"{median(ratios[name]):.3g} |{against}")
    for name in args.variants:
        for failure, n in failures[name].most_common():
            print(f"{name}: {n} x {failure}")


def median(values: list) -> float:
    """The upper median of `values` (NaN if none)."""
    return sorted(values)[len(values) // 2] if values else math.nan


if __name__ == "__main__":
    main()
