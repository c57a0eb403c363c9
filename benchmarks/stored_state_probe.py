"""The tensors a model's forward stores on its modules, after each compiled call, against an eager copy's.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.stored_state_probe --model recurrent_gemma --steps 3

Builds benchmarks/hfseq_probe.py's model (dropout 0, float64), compiles it (kfac, lr 1e-3, statistics every step)
and calls it as its users do (`model(**batch).loss`) beside an eager copy that takes the stepped parameters: per
step, the loss and gradient gaps, and for every tensor attribute a module holds outside its registries (RecurrentGemma's
`conv1d_state`, `recurrent_states`) its gap to the copy's and whether it carries autograd history; then the capture's
form and share of parameters in curvature blocks (passes/state_writes.py).
"""
from __future__ import annotations

import argparse
import copy

import torch

import gnfx
from benchmarks.hfseq_probe import build, problem
from gnfx.passes.module_attributes import REGISTRIES


def stored(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """'module.attribute' -> tensor, for the tensors the modules of `model` hold outside their registries."""
    return {f"{path}.{k}": v for path, m in model.named_modules() for k, v in vars(m).items()
            if k not in REGISTRIES and isinstance(v, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recurrent_gemma")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.model, dropout=0.0).double()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1)
    batch, loss_of = problem(args.model)
    for step in range(args.steps):
        loss, loss_ref = loss_of(c, batch), loss_of(reference, batch)
        loss.backward()
        loss_ref.backward()
        grads = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        print(f"step {step}: loss gap {(loss - loss_ref).abs().item():.1e}, gradient gap {grads:.1e}")
        held, held_ref = stored(model), stored(reference)
        for name, value in held.items():
            print(f"  {name} {tuple(value.shape)}: gap {(value - held_ref[name]).abs().max().item():.1e}, "
                  f"autograd history {value.grad_fn is not None}")
        c.step()
        c.zero_grad()
        reference.zero_grad()
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.copy_(p)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    print(f"capture {c.layers.form}, {100 * covered / total:.1f}% of the parameters in blocks")


if __name__ == "__main__":
    main()
