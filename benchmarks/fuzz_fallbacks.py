"""Which parameters of the fuzzer's composed models stay out of curvature blocks, and why, by capture.

Draws recipes of tests/test_composed_models.py (hypothesis, `--examples` of them, derandomized unless
`--random`), compiles each as the tests do, runs its first forward (a lazily captured graph is captured then)
and counts `compiled.layers.fallbacks` by (capture, reason with quoted names elided), with one example of each.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.fuzz_fallbacks --examples 300 --random
"""
from __future__ import annotations

import argparse
import collections
import copy
import pathlib
import re
import sys
import warnings

from hypothesis import given, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_composed_models as composed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--random", action="store_true", help="new recipes on each run")
    args = parser.parse_args()
    counts, examples, models = collections.Counter(), {}, [0]

    @settings(max_examples=args.examples, derandomize=not args.random, deadline=None, database=None)
    @given(composed.recipes())
    def survey(drawn):
        recipe, features = drawn
        c = composed.compile_recipe(recipe, copy.deepcopy(composed.Composed(recipe, features)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c(composed.data(recipe, 0, (1,))[0], scale=0.5)
        models[0] += 1
        for fallback in c.layers.fallbacks:
            key = (recipe.capture, re.sub(r"'[^']*'", "'…'", fallback.reason))
            counts[key] += 1
            examples.setdefault(key, (fallback.param, recipe.blocks))

    survey()
    print(f"{models[0]} models, {sum(counts.values())} fallback parameters\n")
    print("| parameters | capture | reason | e.g. |\n|---|---|---|---|")
    for (capture, reason), n in counts.most_common():
        param, blocks = examples[capture, reason]
        print(f"| {n} | {capture} | {reason[:200]} | {param} in {blocks} |")


if __name__ == "__main__":
    main()
