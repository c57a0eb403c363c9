"""The main job of `make demo`: train a character-level GPT on the text of Python's own docs.

    python examples/demo.py [--optimizer kfac] [--steps 300]

Compiles the model with gnfx, prints the block table and the rewritten (instrumented) code,
trains with a progress bar, and reports the validation loss against the start. The data is the
text of the standard library's `pydoc_data.topics` (no download); the model and data come from
the benchmark task `char_gpt` (benchmarks/tasks.py).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import char_gpt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="kfac", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    task = char_gpt()
    model = task.make_model(seed=0)
    batches = task.batches(seed=0)
    x, _ = next(batches)
    lr = args.lr or {"diag": 3e-3, "kfac": 3e-3, "shampoo": 3e-3, "rank1": 3e-3}.get(args.optimizer, 3e-3)
    compiled = gnfx.compile(model, optimizer=args.optimizer, lr=lr, example_inputs=(x,))

    print(compiled)  # the block table: blocks, kinds, factor shapes, preconditioner, state memory
    code = compiled.graph_module.code.strip().splitlines()
    print("\nrewritten forward (first lines; taps are the gnfx_taps calls):")
    print("\n".join(code[:24]), "\n    ...")
    print("\ngenerated update step:\n" + compiled.update_code)

    start = task.eval_loss(compiled)
    began = time.perf_counter()
    bar = tqdm(itertools.islice(batches, args.steps), total=args.steps, desc=f"gnfx {args.optimizer}")
    for x, y in bar:
        loss = task.loss_fn(compiled(x), y)
        loss.backward()
        compiled.step()
        compiled.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - began
    end = task.eval_loss(compiled)
    print(f"\nvalidation loss {start:.3f} -> {end:.3f} after {args.steps} steps in {seconds:.1f} s "
          f"({1000 * seconds / args.steps:.1f} ms/step)")


if __name__ == "__main__":
    main()
