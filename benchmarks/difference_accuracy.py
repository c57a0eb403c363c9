"""How far the quadratic step's finite differences are from J v: `python -m benchmarks.difference_accuracy`.

    OMP_NUM_THREADS=1 python -m benchmarks.difference_accuracy --task char_gpt --steps 300 --every 1 --first 40
    OMP_NUM_THREADS=1 python -m benchmarks.difference_accuracy --task digits_autoencoder --steps 150 --every 10

Trains kfac at its defaults (the quadratic step, products by differences where gnfx.quadratic_step says so) on a
task of benchmarks/tasks.py and, on the step's own calls of gnfx.finite_differences.difference_rows (every
call of the first `--first`, then every `--every`-th), measures each quotient against a reference J v:
a central difference of the same f in float64 (θ and v cast, h = 1e-6 (1 + ‖θ‖)/‖v‖; the GPT's token ids
keep the inputs integral) where f runs in float64, else forward mode (gnfx.forward_mode.jvp_rows). Per row of
V: r = h‖J v‖/(√ε‖z‖) of the default step h = √ε(1 + ‖θ‖)/‖v‖, and the relative errors ‖Ĵv − J v‖/‖J v‖ of the
quotient the step took (gnfx's h) and of the quotient at the default h, in the same call. Prints one line per
row and the median and largest of each error.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

import gnfx
from gnfx import finite_differences, quadratic_step
from gnfx.finite_differences import _norms, _quotient, difference_rows
from gnfx.forward_mode import jvp_rows

from benchmarks.tasks import TASKS


def reference(f, primals, tangent_rows) -> list[torch.Tensor]:
    """J v of each row, float64: a central difference in float64, or forward mode where f does not run there."""
    try:
        p64 = [p.double() for p in primals]
        f(p64)
    except RuntimeError:  # float inputs beside float64 parameters
        return [j.double() for j in jvp_rows(f, list(primals), tangent_rows)[1]]
    theta, *lengths = _norms([p64, *tangent_rows])
    rows = []
    for tangents, length in zip(tangent_rows, lengths):
        t64 = [t.double() for t in tangents]
        h = 1e-6 * (1 + theta) / max(length, 1e-300)
        rows.append((f([p + h * t for p, t in zip(p64, t64)]) - f([p - h * t for p, t in zip(p64, t64)])) / (2 * h))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="char_gpt", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--first", type=int, default=0, help="measure every one of the first calls")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls, errors = [0], {"gnfx": [], "default": []}

    def measured(f, primals, tangent_rows, z=None, gains=None):
        out = difference_rows(f, primals, tangent_rows, z, gains)
        calls[0] += 1
        if calls[0] > args.first and calls[0] % args.every:
            return out
        z, products, _ = out
        with torch.no_grad():
            references = reference(f, primals, tangent_rows)
            theta, size, *lengths = _norms([primals, [z], *tangent_rows])
            root_eps = math.sqrt(torch.finfo(z.dtype).eps)
            for k, (tangents, length, ref) in enumerate(zip(tangent_rows, lengths, references)):
                if length == 0 or float(ref.norm()) == 0:
                    continue
                h = root_eps * (1 + theta) / length
                plain = _quotient(f, primals, tangents, z, h)
                r = h * float(ref.norm()) / (root_eps * size)
                taken, default = (float((q.double() - ref).norm() / ref.norm()) for q in (products[k], plain))
                errors["gnfx"].append(taken)
                errors["default"].append(default)
                print(f"call {calls[0]:4d} row {k}: r {r:8.1f}  error {taken:.1e} (default h {default:.1e})",
                      flush=True)
        return out

    quadratic_step.difference_rows = measured
    try:
        task = TASKS[args.task]()
        model = gnfx.compile(task.make_model(args.seed), optimizer="kfac", loss=task.loss_name)
        batches = task.batches(args.seed)
        for _ in range(args.steps):
            x, y = next(batches)
            task.loss_fn(model(x), y).backward()
            model.step()
            model.zero_grad()
    finally:
        quadratic_step.difference_rows = difference_rows
        torch.set_num_threads(threads)
    for name, values in errors.items():
        if values:
            print(f"{name:8s} h: median error {statistics.median(values):.1e}, largest {max(values):.1e} "
                  f"({len(values)} quotients; RETAKE {finite_differences.RETAKE})")


if __name__ == "__main__":
    main()
