"""Every failure of the fuzzer's properties over many composed models, not only the first (pytest stops there).

Draws recipes of tests/test_composed_models.py (hypothesis, `--examples` draws, derandomized unless `--random`),
keeps those whose recipe mentions `--kind` (a block kind, "'mha'", "input='bag'", any text of the printed
recipe; all without it), runs `check` (properties a, b, c) on each and prints each failure with its recipe, then
the count of models and of each block kind drawn.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.fuzz_sweep --examples 1000 --random
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.fuzz_sweep --examples 3000 --random \
        --kind encoder_layer
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import warnings

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_composed_models as composed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--random", action="store_true", help="new recipes on each run")
    parser.add_argument("--kind", default="", help="only recipes whose text contains this")
    args = parser.parse_args()
    drawn, failures = collections.Counter(), []

    @settings(max_examples=args.examples, derandomize=not args.random, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(composed.recipes())
    def sweep(recipe_and_features):
        recipe, features = recipe_and_features
        if args.kind not in repr(recipe):
            return
        drawn.update(["models", f"input {recipe.input}"] + [block[0] for block in recipe.blocks])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                composed.check(recipe, features)
        except Exception as error:  # noqa: BLE001 (every failure is a finding, listed)
            failures.append(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}")
            print(f"FAIL {failures[-1]}\n    {recipe!r}, {features}", flush=True)

    sweep()
    print(f"{drawn.pop('models', 0)} models, {len(failures)} failures; drawn: {dict(drawn.most_common())}")


if __name__ == "__main__":
    main()
