"""The benchmark tasks: small training problems on data that ships with a package or with Python.

Each `Task` builds its model (`make_model(seed)`), streams CPU minibatches (`batches(seed)`),
defines `loss_fn(output, y)`, evaluates the validation loss (`eval_loss(model)`) and sets the
`target` validation loss whose time to reach is the benchmark's measure (`quick_target` for
`--quick`, looser where reaching `target` takes more than a few seconds). Targets were chosen
so that AdamW at its best LR reaches them in a few hundred to ~1,500 steps; the measurement
behind each target (steps at which AdamW, seed 0, first evaluates below it) is in the comment
of its factory function. Beside it, `train_target` is a training-loss (optimization) target: the
loss on a fixed part of the training data (`x_fit`, `y_fit`: the whole training set of the
digits, fixed windows of the training text), low enough that AdamW needs several hundred steps,
since optimization is where curvature pays. `loss_name` names `loss_fn` for gnfx's `loss=`.

- `digits_mlp`: an MLP classifier on scikit-learn's bundled 8x8 digits.
- `digits_autoencoder`: a deep tanh autoencoder of the same digits, MSE.
- `digits_cnn`: a small CNN classifier of the digits as 1x8x8 images.
- `char_gpt`: a 2-layer GPT character model of the text of `pydoc_data.topics`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import GPT, GPTConfig, cnn, mlp

Batch = tuple[torch.Tensor, torch.Tensor]
DIGITS_VAL = 360  # of 1,797 digits, held out for validation
TEXT_VAL_FRACTION = 0.1  # the tail of the text, held out for validation
TEXT_VAL_WINDOWS = 128  # fixed validation windows of the character model (and as many training windows)
# training-loss targets (on x_fit, y_fit). AdamW (seed 0) reaches them first at: digits MLP 1e-4: lr 1e-2 ~355 steps
# (3e-3, 1e-3: not in 600); autoencoder 0.003: 1e-2 ~600, 3e-3 ~810, 1e-3 not in 1,200; CNN 1e-3 and GPT 1.8:
# see benchmarks/results/quadratic_step.md
TRAIN_TARGETS = {"digits_mlp": 1e-4, "digits_autoencoder": 0.003, "digits_cnn": 1e-3, "char_gpt": 1.8}


@dataclasses.dataclass
class Task:
    """A training problem: a model, its data, its loss and the validation loss to reach."""

    name: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x_val: torch.Tensor
    y_val: torch.Tensor
    target: float
    quick_target: float  # the target of the quick mode, reached in a few seconds
    max_steps: int  # the step budget of a run
    eval_every: int  # steps between validation evaluations
    batch_size: int
    train_target: float = dataclasses.field(kw_only=True)  # on the fixed training examples x_fit, y_fit
    x_fit: torch.Tensor = dataclasses.field(kw_only=True)
    y_fit: torch.Tensor = dataclasses.field(kw_only=True)
    loss_name: str = dataclasses.field(kw_only=True)  # "cross_entropy" or "mse", as gnfx.compile's loss=

    def make_model(self, seed: int) -> nn.Module:
        """The task's model, initialized from `seed`."""
        torch.manual_seed(seed)
        return self.build()

    def batches(self, seed: int) -> Iterator[Batch]:
        """An endless stream of training minibatches (x, y), determined by `seed`."""
        raise NotImplementedError

    def eval_loss(self, model: nn.Module) -> float:
        """The loss of `model` on the whole validation set, in chunks of `batch_size` examples.

        Chunking keeps evaluation's memory below a training step's, so that it does not set the
        peak memory the benchmark reports.
        """
        return self._mean_loss(model, self.x_val, self.y_val)

    def fit_loss(self, model: nn.Module) -> float:
        """The loss of `model` on the fixed training examples (x_fit, y_fit), chunked as eval_loss."""
        return self._mean_loss(model, self.x_fit, self.y_fit)

    def _mean_loss(self, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for x, y in zip(xs.split(self.batch_size), ys.split(self.batch_size)):
                total += float(self.loss_fn(model(x), y)) * len(x)
        return total / len(xs)


@dataclasses.dataclass
class ArrayTask(Task):
    """A task on a fixed training set, sampled in shuffled epochs."""

    x_train: torch.Tensor = dataclasses.field(kw_only=True)
    y_train: torch.Tensor = dataclasses.field(kw_only=True)

    def batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                idx = order[start:start + self.batch_size]
                yield self.x_train[idx], self.y_train[idx]


@dataclasses.dataclass
class TextTask(Task):
    """A next-token task on a token stream, sampled as random windows of `context` tokens."""

    tokens: torch.Tensor = dataclasses.field(kw_only=True)
    context: int = dataclasses.field(kw_only=True)

    def batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield windows(self.tokens, self.context, self.batch_size, generator)


def windows(tokens: torch.Tensor, context: int, count: int, generator: torch.Generator) -> Batch:
    """`count` random windows of `tokens`: inputs (count, context) and next tokens, shifted by one."""
    starts = torch.randint(len(tokens) - context, (count,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as raw pixels (0..16, shape (n, 64)) and labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y, dtype=torch.long)[order]


def _digits_split(standardize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): pixels standardized with the training statistics, or scaled to [0, 1]."""
    x, y = _digits()
    x_train, x_val = x[DIGITS_VAL:], x[:DIGITS_VAL]
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    else:
        x_train, x_val = x_train / 16, x_val / 16
    return x_train, y[DIGITS_VAL:], x_val, y[:DIGITS_VAL]


def digits_mlp() -> Task:
    """MLP 64-128-128-10 (ReLU) classifying standardized digits; cross-entropy."""
    # AdamW, val cross-entropy 0.07 first reached at step: lr 3e-3: 155, 2e-3: 240, 1e-3 and 1e-2:
    # not in 600 (best 0.070 and 0.129). lr 3e-3 reaches 0.08 at 110, 0.065 at 230; plateau 0.061.
    x_train, y_train, x_val, y_val = _digits_split(standardize=True)
    return ArrayTask("digits_mlp", lambda: mlp([64, 128, 128, 10]), F.cross_entropy, x_val, y_val,
                     target=0.07, quick_target=0.07, max_steps=600, eval_every=5, batch_size=128,
                     x_train=x_train, y_train=y_train, x_fit=x_train, y_fit=y_train,
                     train_target=TRAIN_TARGETS["digits_mlp"],
                     loss_name="cross_entropy")


def digits_autoencoder() -> Task:
    """Deep autoencoder 64-128-64-32-64-128-64 (tanh) of digits scaled to [0, 1]; MSE.

    The pixels are scaled, not standardized: a few nearly constant pixels would get z-scores
    above 40 and dominate the squared error.
    """
    # AdamW, val MSE 0.004 first reached at step: lr 1e-2: 390, 5e-3: 440, 3e-3: 620, 1e-3: >470
    # (0.01 at 470). lr 1e-2 reaches 0.008 at 170, 0.003 at 640; 3e-3 ends at 0.0026 after 1,500.
    x_train, _, x_val, _ = _digits_split(standardize=False)
    return ArrayTask("digits_autoencoder", lambda: mlp([64, 128, 64, 32, 64, 128, 64], nn.Tanh), F.mse_loss,
                     x_val, x_val, target=0.004, quick_target=0.004, max_steps=1200, eval_every=10, batch_size=128,
                     x_train=x_train, y_train=x_train, x_fit=x_train, y_fit=x_train,
                     train_target=TRAIN_TARGETS["digits_autoencoder"], loss_name="mse")


def digits_cnn() -> Task:
    """CNN (two 3x3 convolutions, max-pool, linear head) classifying standardized 1x8x8 digits."""
    # AdamW, val cross-entropy 0.08 first reached at step: lr 1e-2: 75, 3e-3: 130, 1e-3: not
    # (best 0.106 at 315). The CNN overfits within ~150 steps (1e-2: best 0.065 at 80, then up),
    # so this task is short; batch 32 did not lengthen it (1e-2: 135 steps, 3e-3: best 0.093).
    x_train, y_train, x_val, y_val = _digits_split(standardize=True)
    images = lambda x: x.view(-1, 1, 8, 8)  # noqa: E731
    return ArrayTask("digits_cnn", cnn, F.cross_entropy, images(x_val), y_val,
                     target=0.08, quick_target=0.08, max_steps=400, eval_every=5, batch_size=128,
                     x_train=images(x_train), y_train=y_train, x_fit=images(x_train), y_fit=y_train,
                     train_target=TRAIN_TARGETS["digits_cnn"], loss_name="cross_entropy")


@functools.cache
def _text() -> str:
    """The text of Python's pydoc topics, the values of `pydoc_data.topics.topics` joined in key order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[key] for key in sorted(topics))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (batch, time, vocab) against targets (batch, time)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def char_gpt() -> Task:
    """GPT (2 layers, d_model 64, 4 heads, context 64) on the characters of pydoc's topics."""
    # AdamW, val cross-entropy first reached at step (evaluated every 25):
    #   lr 3e-3: 2.6: 75, 2.0: 275, 1.8: 425, 1.5: 800 (1.36 after 1,500);
    #   lr 1e-3: 2.0: 375, 1.8: 575; lr 2e-3: 1.7: 475, 1.5: 875; lr 1e-2: 2.0: 775, 1.8: 1000.
    #   Batch 16 at lr 3e-3 is slower per token: 2.0 at 775 steps.
    # A step takes ~20 ms on 2 idle cores (50 ms and more when other processes share them), so
    # the target is 1.8 (~9 s) and the quick target 2.6 (~1.5 s), within the modes' time budgets.
    text = _text()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    tokens = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(len(tokens) * (1 - TEXT_VAL_FRACTION))
    config = GPTConfig(vocab_size=len(vocab))
    x_val, y_val = windows(tokens[split:], config.context, TEXT_VAL_WINDOWS, torch.Generator().manual_seed(0))
    x_fit, y_fit = windows(tokens[:split], config.context, TEXT_VAL_WINDOWS, torch.Generator().manual_seed(1))
    return TextTask("char_gpt", lambda: GPT(config), sequence_loss, x_val, y_val,
                    target=1.8, quick_target=2.6, max_steps=800, eval_every=25, batch_size=32,
                    tokens=tokens[:split], context=config.context, x_fit=x_fit, y_fit=y_fit,
                    train_target=TRAIN_TARGETS["char_gpt"], loss_name="cross_entropy")


TASKS: dict[str, Callable[[], Task]] = {
    "digits_mlp": digits_mlp,
    "digits_autoencoder": digits_autoencoder,
    "digits_cnn": digits_cnn,
    "char_gpt": char_gpt,
}
