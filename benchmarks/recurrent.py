"""Recurrent layers as curvature blocks: steps to a training-loss target on a character LSTM, and
the lowered recurrent forward against torch's fused kernel (results/recurrent.md).

    OMP_NUM_THREADS=1 python -m benchmarks.recurrent --target 1.4 --max-steps 1500 --seeds 0 1
    OMP_NUM_THREADS=1 python -m benchmarks.recurrent --target 1.6 --optimizers kfac "adamw lr=1e-2"
    OMP_NUM_THREADS=1 python -m benchmarks.recurrent --kernels      # fused vs lowered, T=64, N=32, H=256
    OMP_NUM_THREADS=1 python -m benchmarks.recurrent --task recall --proj-size 16 --target 0.1 --max-steps 600

The model: Embedding(V, 64) -> nn.LSTM(64, 128, batch_first=True) -> Linear(128, V) on the text of
the char_gpt task (its windows: batch 32, context 64). "kfac" is `gnfx.compile(model,
optimizer="kfac", loss="cross_entropy")` (the quadratic-model step, no lr); "kfac (LSTM opaque)" the
same with `leaf_modules=["rnn"]`, the LSTM's weights in diag as before gnfx lowered recurrent layers;
"adamw lr=X" torch.optim.AdamW. The loss on the task's fixed training examples is evaluated every
`--every` steps; a row gives the first evaluation at or below the target, that loss and the seconds to it.
`--proj-size P` gives the LSTM projections (nn.LSTM's proj_size: h_t = W_hr h̃_t, P outputs, the head
Linear(P, V)); `--task recall` trains on `DelayedRecall`, a synthetic task, instead of the text.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import fx, nn

import gnfx
from benchmarks.tasks import char_gpt, sequence_loss
from gnfx.passes.recurrent import lower_recurrent

OPTIMIZERS = ("kfac", "kfac (LSTM opaque)", "adamw lr=1e-3", "adamw lr=3e-3", "adamw lr=1e-2")


class CharLSTM(nn.Module):
    def __init__(self, vocabulary: int, width: int = 64, hidden: int = 128, proj_size: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.rnn = nn.LSTM(width, hidden, batch_first=True, proj_size=proj_size)
        self.head = nn.Linear(proj_size or hidden, vocabulary)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


class DelayedRecall:
    """A synthetic sequence task: uniform random tokens of `vocabulary` symbols, (batch, steps), the target
    at step t the token at t - `delay` (0 for t < delay), learnable only through the recurrence's memory
    of the last `delay` tokens (chance: ln V); fresh batches each step, the fit loss on a fixed 128."""

    def __init__(self, vocabulary: int = 8, steps: int = 24, delay: int = 3, batch_size: int = 32):
        self.vocabulary, self.steps, self.delay, self.batch_size = vocabulary, steps, delay, batch_size
        self.x_fit, self.y_fit = self.batch(128, torch.Generator().manual_seed(12345))

    def batch(self, count: int, generator: torch.Generator):
        x = torch.randint(self.vocabulary, (count, self.steps), generator=generator)
        return x, torch.cat([x.new_zeros(count, self.delay), x[:, :-self.delay]], 1)

    def batches(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(self.batch_size, generator)

    def fit_loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(sequence_loss(model(self.x_fit), self.y_fit))


def vocabulary(task) -> int:
    """The number of token ids of `task`: DelayedRecall's own, the text's largest id + 1."""
    return task.vocabulary if isinstance(task, DelayedRecall) else int(task.tokens.max()) + 1


def to_target(task, name: str, seed: int, target: float, max_steps: int, every: int, proj_size: int = 0):
    """(steps to `target` or None, the training-examples loss there or at the end, seconds)."""
    torch.manual_seed(seed)
    model = CharLSTM(vocabulary(task), proj_size=proj_size)
    if name.startswith("kfac"):
        forward = gnfx.compile(model, optimizer="kfac", loss="cross_entropy",
                               leaf_modules=["rnn"] if "opaque" in name else ())
        step, zero = forward.step, forward.zero_grad
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(name.split("=")[1]))
        forward, step, zero = model, optimizer.step, optimizer.zero_grad
    batches, start, fit = task.batches(seed), time.perf_counter(), float("nan")
    for t in range(1, max_steps + 1):
        x, y = next(batches)
        sequence_loss(forward(x), y).backward()
        step()
        zero()
        if t % every == 0:
            fit = task.fit_loss(model)
            if fit <= target:
                return t, fit, time.perf_counter() - start
    return None, fit, time.perf_counter() - start


class _Output(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def kernel_times(steps: int = 64, batch: int = 32, width: int = 256, repeats: int = 7) -> dict:
    """Milliseconds (median of `repeats`) of the fused module and of its lowered graph, forward and
    forward+backward, for nn.LSTM and nn.GRU of `width` inputs and hidden units."""
    x, times = torch.randn(batch, steps, width), {}
    for cell in (nn.LSTM, nn.GRU):
        fused = _Output(cell(width, width, batch_first=True))
        for form, module in (("fused", fused), ("lowered", lower_recurrent(fx.symbolic_trace(fused)))):
            for backward in (False, True):
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    out = module(x)
                    if backward:
                        out.sum().backward()
                    seconds.append(time.perf_counter() - start)
                times[(cell.__name__, form + ("+backward" if backward else ""))] = sorted(seconds)[repeats // 2] * 1e3
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=1.4)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--kernels", action="store_true", help="time the fused and lowered forms instead")
    parser.add_argument("--proj-size", type=int, default=0, help="the LSTM's proj_size (0: none)")
    parser.add_argument("--task", choices=("text", "recall"), default="text")
    args = parser.parse_args(argv)
    unknown = [n for n in args.optimizers if not (n.startswith("kfac") or n.startswith("adamw lr="))]
    if unknown:
        parser.error(f"unknown optimizers {unknown}: use kfac, 'kfac (LSTM opaque)' or 'adamw lr=X'")
    torch.set_num_threads(1)
    if args.kernels:
        for (cell, form), ms in kernel_times().items():
            print(f"| {cell} | {form} | {ms:.1f} |", flush=True)
        return
    task = char_gpt() if args.task == "text" else DelayedRecall()
    print(f"| seed | optimizer | steps to {args.target} | loss there (or at {args.max_steps}) | seconds |")
    for seed in args.seeds:
        for name in args.optimizers:
            steps, fit, seconds = to_target(task, name, seed, args.target, args.max_steps, args.every,
                                            args.proj_size)
            print(f"| {seed} | {name} | {steps or f'not in {args.max_steps}'} | {fit:.3f} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
