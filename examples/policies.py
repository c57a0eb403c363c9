"""Per-layer preconditioners: a policy of glob patterns, and optimizer="auto" under budgets.

    python examples/policies.py

Compiles a small GPT (2 layers, d_model 64) five ways and trains each a few steps on random
tokens: with a policy (Shampoo for attention, K-FAC with its own damping for the MLPs, diag for
the rest), and with optimizer="auto" at three (memory, compute) budgets, multiples of the
parameters' memory and of an AdamW step. For each it prints the chosen plan (preconditioner and
reason per block) and `model.cost()`; at the end, the sympy formula of one block's memory,
evaluated at the sizes of a larger model.
"""
from __future__ import annotations

import collections
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.models import GPT, GPTConfig  # noqa: E402
from gnfx.cost import SYMBOLS  # noqa: E402

CONFIG = GPTConfig(vocab_size=65, context=32, d_model=64, n_layer=2, n_head=4)
POLICY = {"*.attn.*": "shampoo", "*.mlp.*": ("kfac", {"damping": 1e-2}), "*": "diag"}
BUDGETS = [(4.0, 5.0), (8.0, 30.0), (16.0, 200.0)]


def train(model, steps: int = 4) -> float:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.context + 1), generator=g)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.step()
        model.zero_grad()
    return loss.item()


def show(title: str, model) -> None:
    print(f"\n=== {title}")
    width = max(len(b.name) for b in model.layers)
    for b in model.layers:
        print(f"  {b.name:<{width}}  {b.preconditioner:<8} {model.layers.plan.entries[b.name].reason}")
    loose = collections.Counter(f.preconditioner for f in model.layers.fallbacks)
    print("  loose parameters: " + ", ".join(f"{n} with {name}" for name, n in loose.items()))
    print(f"  loss after 4 steps: {train(model):.3f}\n")
    print(model.cost(batch_size=8, positions=CONFIG.context))


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    show(f"policy {POLICY}", gnfx.compile(GPT(CONFIG), optimizer=POLICY, lr=1e-3))
    for memory, compute in BUDGETS:
        torch.manual_seed(0)
        model = gnfx.compile(GPT(CONFIG), optimizer="auto", lr=1e-3, memory_budget=memory, compute_budget=compute)
        show(f'optimizer="auto", memory_budget={memory:g}, compute_budget={compute:g}', model)

    cost = model.cost()
    name = "blocks.0.mlp.0"
    memory = cost.formulas[name]["memory"]
    larger = memory.subs({**cost.values[name], SYMBOLS["d_in"]: 1024, SYMBOLS["d_out"]: 4096})
    print(f"\nmemory of {name} under {model.layers[name].preconditioner}, in bytes: {memory}")
    print(f"the same block at d_model 1024 (d_in 1024, d_out 4096): {int(larger) / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
