"""Does the compiled model train the function the model computes? Plain-torch forwards whose Python torch.fx answers
for a placeholder (type tests, tuples of torch.nn layers, hooks on the model, switches of gradient recording) and
layers read in unusual ways: `python -m benchmarks.trace_semantics [--out FILE]`.

Each row: gnfx.compile(model, "kfac", lr=1e-2, stat_every=1) without example inputs, one statistic step on a batch,
and the largest differences of its loss and of every gradient from the model's own (float64), with the graph form
and the share of the trainable entries in curvature blocks; "error" where the step raised.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell


class Wrapped(nn.Module):
    """`out = layer(x)`, then the forward's own Python (`then(self, x, out)`), then a linear head."""

    def __init__(self, layer: nn.Module, width: int, then=None):
        super().__init__()
        self.layer, self.head, self.then = layer, nn.Linear(width, 3), then

    def forward(self, x, mask=None):
        out = self.layer(x)
        out = self.then(self, x, out, mask) if self.then else out
        return self.head(out.flatten(1))


def first_of_tuple(_, __, out, ___):
    if isinstance(out, tuple):
        out = out[0]
    return out


def masked_when_tensor(_, __, out, mask):
    if isinstance(mask, torch.Tensor):
        out = out * mask
    return out


def scaled_when_tensor(_, __, out, ___):
    if isinstance(out, torch.Tensor):
        out = 2 * out
    return out


def teacher_without_gradients(module, x, out, _):
    with torch.no_grad():
        t = module.teacher(x)
    return out + t


def probe_in_inference_mode(module, x, out, _):
    with torch.inference_mode():
        t = module.teacher(x)
    return out + t.clone()


def tied_transpose(module, _, out, __):
    return F.linear(torch.tanh(out), module.layer.weight.t())


def _with_teacher(model):
    model.teacher = nn.Linear(4, 6)
    return model


def _hooked(model, pre: bool):
    if pre:
        model.register_forward_pre_hook(lambda _, inputs: (3 * inputs[0], *inputs[1:]))
    else:
        model.register_forward_hook(lambda _, __, out: 2 * out)
    return model


CASES = {  # name: (the model, its input shape, whether a (N, 6) mask is passed)
    "GRU, isinstance(out, tuple)": (lambda: Wrapped(nn.GRU(4, 6, batch_first=True), 18, first_of_tuple), (8, 3, 4), False),
    "LSTM, isinstance(out, tuple)": (lambda: Wrapped(nn.LSTM(4, 6, batch_first=True), 18, first_of_tuple), (8, 3, 4),
                                     False),
    "MultiheadAttention, isinstance(out, tuple)": (
        lambda: Wrapped(_SelfAttention(), 12, first_of_tuple), (8, 3, 4), False),
    "MaxPool1d(return_indices), isinstance": (
        lambda: Wrapped(nn.MaxPool1d(2, return_indices=True), 4, first_of_tuple), (8, 2, 4), False),
    "isinstance(mask, torch.Tensor)": (lambda: Wrapped(nn.Linear(4, 6), 6, masked_when_tensor), (8, 4), True),
    "isinstance(h, torch.Tensor)": (lambda: Wrapped(nn.Linear(4, 6), 6, scaled_when_tensor), (8, 4), False),
    "forward hook on the model": (lambda: _hooked(Wrapped(nn.Linear(4, 6), 6), pre=False), (8, 4), False),
    "forward pre-hook on the model": (lambda: _hooked(Wrapped(nn.Linear(4, 6), 6), pre=True), (8, 4), False),
    "teacher under torch.no_grad": (
        lambda: _with_teacher(Wrapped(nn.Linear(4, 6), 6, teacher_without_gradients)), (8, 4), False),
    "probe under torch.inference_mode": (
        lambda: _with_teacher(Wrapped(nn.Linear(4, 6), 6, probe_in_inference_mode)), (8, 4), False),
    "linear weight read transposed too (tied autoencoder)": (
        lambda: Wrapped(nn.Linear(4, 6), 4, tied_transpose), (8, 4), False),
    "nn.Bilinear": (lambda: _Bilinear(), (8, 9), False),
    "nn.LSTM(proj_size=2)": (lambda: Wrapped(nn.LSTM(4, 6, proj_size=2, batch_first=True), 6, first_of_tuple),
                             (8, 3, 4), False),
    "nn.Embedding(max_norm=1)": (lambda: _Lookup(nn.Embedding(20, 6, max_norm=1.0)), None, False),
    "torch.index_select(W, 0, ids)": (lambda: _Lookup(None), None, False),
}


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear, self.head = nn.Bilinear(5, 4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bilinear(x[:, :5], x[:, 5:])))


class _Lookup(nn.Module):
    """An embedding (or, `table` None, a parameter read by torch.index_select) of 20 tokens, 3 per example."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.weight = nn.Parameter(torch.randn(20, 6)) if table is None else None
        self.head = nn.Linear(18, 3)

    def forward(self, ids):
        rows = self.table(ids) if self.table is not None else torch.index_select(self.weight, 0, ids.flatten())
        return self.head(rows.reshape(ids.shape[0], -1))


def row(name: str) -> str:
    make, shape, masked = CASES[name]
    torch.manual_seed(0)
    model = make().double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (8, 3), generator=g) if shape is None else torch.randn(shape, generator=g).double()
    inputs = (x, (torch.rand(8, 6, generator=g) > 0.5).double()) if masked else (x,)
    y = torch.randint(0, 3, (8,), generator=g)
    c = loss_gap = grad_gap = None
    try:
        c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
        loss, loss_ref = F.cross_entropy(c(*inputs), y), F.cross_entropy(reference(*inputs), y)
        loss.backward()
        loss_ref.backward()
        loss_gap = abs(loss.item() - loss_ref.item())
        grad_gap = max(((p.grad if p.grad is not None else torch.zeros_like(p))
                        - (q.grad if q.grad is not None else torch.zeros_like(q))).abs().max().item()
                       for p, q in zip(model.parameters(), reference.parameters()))
        c.step()
        outcome = f"{loss_gap:.1e} | {grad_gap:.1e}"
    except Exception as exc:  # noqa: BLE001 - what a user would see is the result
        outcome = f"error: {cell(f'{type(exc).__name__}: {exc}', 120)} | –"
    form, blocks, outside = capture_cells(c, model)
    return f"| {name} | {form} | {blocks} | {outcome} | {cell(outside, 120)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    lines = ["| forward | form | in blocks | loss gap | largest gradient gap | outside blocks |",
             "|---|---|---|---|---|---|"] + [row(name) for name in args.cases]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
