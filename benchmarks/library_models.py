"""Defaults on model-library look-alikes over longer runs: does any optimizer diverge, crash or stall?

    OMP_NUM_THREADS=1 python -m benchmarks.library_models [--steps 200] [--seed 0] [--models vit gpt2] \
        [--optimizers kfac adamw_1e-3] [--out tables.md]

The first-contact rounds (benchmarks/results/first_contact_2.md, first_contact_3.md) ran look-alikes
of model-library models for 6 steps on one batch. Here small look-alikes of the same code patterns
train on a learnable task for `--steps` steps: each gnfx optimizer as
`gnfx.compile(model, optimizer=NAME, loss=LOSS)` with nothing else (no lr: the quadratic-model step
for kfac and ekfac, each optimizer's fixed default lr for the others), and torch.optim.AdamW at lr
1e-3 and 3e-3, all from the same initial weights on the same batch stream. The loss on a fixed
held-out batch is evaluated every EVAL_EVERY steps on the original module (train mode off, so
dropout and DropPath are off and BatchNorm uses its running statistics).

Per model and optimizer: the held-out loss at the start, its best and its end; `diverged` (a
non-finite loss or one above benchmarks.train.DIVERGENCE_FACTOR times the initial one at an
evaluation; the run stops there), `failed` (an exception, with its message), `stalled` (the end loss
above STALL_FACTOR times AdamW 1e-3's end loss and above it by STALL_MARGIN), and the steps to the
target: the held-out loss the better AdamW run reaches at half the run (so AdamW reaches it).

The models (benchmarks/library_lookalikes.py), their tasks:
- `resnet_gn` (timm's GroupNorm ResNets), `mobilenet` (torchvision MobileNetV3's depthwise, BatchNorm,
  hardswish and squeeze-excitation), `effnet_convnext` (timm's MBConv with SE and DropPath, a ConvNeXt
  block with layer scale), `vit` (timm's ViT: patch conv, class token, SDPA), `swin` (shifted window
  attention with a relative position bias table), `moe` (top-2 routed experts), `lora` (PEFT LoRA on a
  frozen MLP with a trained head): digits classification (8x8 standardized images).
- `dcgan`: a conv encoder and a DCGAN ConvTranspose decoder reconstructing the digits, mse.
- `bert`: a BERT sequence classifier called `model(**batch)` with the loss inside: which of three
  token groups is most frequent among the unpadded tokens.
- `gpt2` (Hugging Face GPT-2: Conv1D, tied head, labels with -100 on padding, `out.loss`) and `llama`
  (RoPE, RMSNorm, SwiGLU, causal SDPA): next-character prediction on the text of pydoc's topics
  (benchmarks.tasks' char_gpt text).
- `wav2vec2`: a strided Conv1d feature extractor and a weight-normed grouped positional conv, classifying
  the frequency of a noisy sine wave.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import gnfx

from benchmarks.library_lookalikes import (DCGAN, BertForSequenceClassification, GPT2LMHeadModel, Llama,
                                           MBConvConvNeXt, MobileNet, MoE, ResNetGN, Swin, ViT, Wav2Vec2, lora_mlp)
from benchmarks.tasks import TEXT_VAL_FRACTION, _digits_split, _text, windows
from benchmarks.train import DIVERGENCE_FACTOR

GNFX_OPTIMIZERS = ("kfac", "ekfac", "rank1", "shampoo", "soap", "auto")
ADAMW_LRS = (1e-3, 3e-3)
EVAL_EVERY = 10
STALL_FACTOR = 2.0
STALL_MARGIN = 0.05
BATCH = 64
NORM_SEED = 10_000  # the batch stream whose first batches recompute BatchNorm statistics (held_out_loss)


# ---------------------------------------------------------------- tasks

Batch = Any  # a tuple (x, y) or a dict of keyword arguments


@dataclasses.dataclass
class Problem:
    """A model and its task: `loss(model, batch)` is the training loss, `batches(seed)` an endless
    stream, `held_out` one fixed batch, `loss_name` gnfx.compile's loss=; `norm_batches` > 0: the
    held-out loss is taken with BatchNorm's running statistics recomputed from the current weights
    on that many training batches (`held_out_loss`)."""

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    batches: Callable[[int], Iterator[Batch]]
    held_out: Batch
    loss_name: str = "cross_entropy"
    norm_batches: int = 0


def _classify(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _output_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def _sampled(x: torch.Tensor, y: torch.Tensor, seed: int) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(x), (BATCH,), generator=generator)
        yield x[idx], y[idx]


def _digits_images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


def digits_problem(build: Callable[[], nn.Module],
                   images: Callable[[torch.Tensor], torch.Tensor] = _digits_images, norm_batches: int = 0) -> Problem:
    """Digits classification (standardized pixels), the rows of 64 pixels made model inputs by `images`
    (by default 1x8x8 images); the held-out batch is the first 256 validation digits."""
    x_train, y_train, x_val, y_val = _digits_split(standardize=True)
    x_train, held_out = images(x_train), images(x_val[:256])
    return Problem(build, _classify, lambda seed: _sampled(x_train, y_train, seed), (held_out, y_val[:256]),
                   norm_batches=norm_batches)


def _dcgan_problem() -> Problem:
    x_train, _, x_val, _ = _digits_split(standardize=False)
    images = lambda x: x.view(-1, 1, 8, 8) * 2 - 1  # noqa: E731
    return Problem(DCGAN, lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
                   lambda seed: _sampled(images(x_train), images(x_train), seed),
                   (images(x_val[:256]), images(x_val[:256])), loss_name="mse")


CONTEXT = 32


def _text_tokens() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = _text()
    index = {ch: i for i, ch in enumerate(sorted(set(text)))}
    tokens = torch.tensor([index[ch] for ch in text])
    split = int(len(tokens) * (1 - TEXT_VAL_FRACTION))
    return tokens[:split], tokens[split:], len(index)


def _llama_problem() -> Problem:
    train, val, vocab = _text_tokens()

    def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def stream(seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield windows(train, CONTEXT, BATCH // 2, generator)
    return Problem(lambda: Llama(vocab), lm_loss, stream, windows(val, CONTEXT, 64, torch.Generator().manual_seed(0)))


def _gpt2_batch(chunk: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Windows as Hugging Face's collator pads them: a random tail of some rows padded, labels -100 there."""
    ids = chunk.clone()
    mask = torch.ones_like(ids)
    lengths = torch.randint(CONTEXT // 2, CONTEXT + 1, (len(ids),), generator=generator)
    mask[torch.arange(CONTEXT)[None, :] >= lengths[:, None]] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gpt2_problem() -> Problem:
    train, val, vocab = _text_tokens()

    def stream(seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            x, _ = windows(train, CONTEXT, BATCH // 2, generator)
            yield _gpt2_batch(x, generator)
    generator = torch.Generator().manual_seed(0)
    held_out = _gpt2_batch(windows(val, CONTEXT, 64, generator)[0], generator)
    return Problem(lambda: GPT2LMHeadModel(vocab, CONTEXT), _output_loss, stream, held_out)


def _bert_batch(generator: torch.Generator, count: int, vocab: int = 30, length: int = 12) -> dict[str, torch.Tensor]:
    """Token ids 1..vocab-1 with padded tails; the label is the most frequent of the groups id mod 3
    among the unpadded tokens (ties to the lowest group); token type 1 on the second half."""
    ids = torch.randint(1, vocab, (count, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    counts = F.one_hot(ids % 3, 3).mul(mask[..., None]).sum(1)
    types = (torch.arange(length) >= length // 2).long().expand(count, -1)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": counts.argmax(1)}


def _bert_problem() -> Problem:
    def stream(seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed + 1)
        while True:
            yield _bert_batch(generator, BATCH)
    return Problem(lambda: BertForSequenceClassification(30, 12, 3), _output_loss, stream,
                   _bert_batch(torch.Generator().manual_seed(10_000), 256))


def _waves(generator: torch.Generator, count: int, length: int = 80) -> Batch:
    """Sine waves of frequency class k in 0..4 (k+1 periods per 40 samples), random phase, noise 0.5."""
    k = torch.randint(0, 5, (count,), generator=generator)
    phase = torch.rand(count, 1, generator=generator) * 2 * math.pi
    t = torch.arange(length)
    x = torch.sin(2 * math.pi * (k[:, None] + 1) * t / 40 + phase) + 0.5 * torch.randn(count, length, generator=generator)
    return x, k


def _wav2vec2_problem() -> Problem:
    def stream(seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed + 1)
        while True:
            yield _waves(generator, BATCH)
    return Problem(Wav2Vec2, _classify, stream, _waves(torch.Generator().manual_seed(10_000), 256))


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "resnet_gn": lambda: digits_problem(ResNetGN),
    "mobilenet": lambda: digits_problem(MobileNet),
    "effnet_convnext": lambda: digits_problem(MBConvConvNeXt),
    "vit": lambda: digits_problem(ViT),
    "swin": lambda: digits_problem(Swin),
    "moe": lambda: digits_problem(MoE),
    "lora": lambda: digits_problem(lora_mlp),
    "dcgan": _dcgan_problem,
    "bert": _bert_problem,
    "gpt2": _gpt2_problem,
    "llama": _llama_problem,
    "wav2vec2": _wav2vec2_problem,
}


# ---------------------------------------------------------------- runs

@dataclasses.dataclass
class Run:
    """One model trained by one optimizer: the held-out loss every EVAL_EVERY steps (`curve`), and the
    verdict: 'ok', 'diverged' (stopped there) or 'failed' (`reason`)."""

    model: str
    optimizer: str
    status: str = "ok"
    reason: str = ""
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    last_step: dict = dataclasses.field(default_factory=dict)  # gnfx's quadratic step at the end

    @property
    def start(self) -> float:
        return self.curve[0][1]

    @property
    def end(self) -> float:
        return self.curve[-1][1]

    @property
    def best(self) -> float:
        return min(loss for _, loss in self.curve)

    def steps_to(self, target: float) -> int | None:
        return next((step for step, loss in self.curve if loss <= target), None)


def held_out_loss(problem: Problem, model: nn.Module) -> float:
    """The loss on the fixed held-out batch, the module in eval mode (restored after). With
    `problem.norm_batches` the BatchNorm layers' running statistics are first recomputed as the plain
    average (momentum None) of their batch statistics over the first norm_batches batches of the
    stream of seed NORM_SEED, in train mode: torchvision's BatchNorm momentum (0.1, MobileNetV3's
    0.01) leaves the running statistics mostly those of the initial weights for hundreds of steps,
    and the eval-mode loss then stays at chance for every optimizer. The running statistics, the
    momentum and the random state are restored after, so training does not depend on evaluations."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not problem.norm_batches or not norms:
        return _eval_loss(problem, model)
    saved = [(m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
    random_state = torch.get_rng_state()
    was_training = model.training
    try:
        model.train()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            for _, batch in zip(range(problem.norm_batches), problem.batches(NORM_SEED)):
                problem.loss(model, batch)
        return _eval_loss(problem, model)
    finally:
        model.train(was_training)
        torch.set_rng_state(random_state)
        for m, (momentum, buffers) in zip(norms, saved):
            m.momentum = momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)



def _eval_loss(problem: Problem, model: nn.Module) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(problem.loss(model, problem.held_out))
    model.train(was_training)
    return loss


def train(name: str, optimizer: str, steps: int, seed: int = 0,
          problems: dict[str, Callable[[], Problem]] = PROBLEMS) -> Run:
    """Train problems[name] with `optimizer` (a gnfx optimizer at its defaults, or 'adamw_<lr>'), its
    warnings silenced (the coverage and per-example warnings that first_contact_*.md lists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _train(name, problems[name](), optimizer, steps, seed)


def _train(name: str, problem: Problem, optimizer: str, steps: int, seed: int) -> Run:
    torch.manual_seed(seed)
    model = problem.build()
    run = Run(name, optimizer)
    stream = problem.batches(seed)
    run.curve.append((0, held_out_loss(problem, model)))
    start = time.perf_counter()
    try:
        if optimizer.startswith("adamw_"):
            adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(optimizer[6:]))
            trained, step, zero_grad = model, adamw.step, adamw.zero_grad
        else:
            trained = gnfx.compile(model, optimizer=optimizer, loss=problem.loss_name)
            step, zero_grad = trained.step, trained.zero_grad
        for t in range(1, steps + 1):
            problem.loss(trained, next(stream)).backward()
            step()
            zero_grad()
            if t % EVAL_EVERY == 0 or t == steps:
                loss = held_out_loss(problem, model)
                run.curve.append((t, loss))
                if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * run.start:
                    run.status = "diverged"
                    break
        if not optimizer.startswith("adamw_"):
            run.last_step = dict(trained.optimizer.last_step)
    except Exception as error:  # noqa: BLE001  (a crash is a result of this benchmark, reported with its message)
        run.status, run.reason = "failed", f"{type(error).__name__}: {str(error)[:200]}"
    run.seconds = time.perf_counter() - start
    return run


def verdicts(runs: list[Run]) -> list[dict]:
    """Per run: start/best/end, the verdict (ok, stalled, diverged, failed) and the steps to the target
    (the held-out loss the better AdamW run reaches at half the run)."""
    adamw = [r for r in runs if r.optimizer.startswith("adamw_") and r.status == "ok"]
    reference = next((r for r in adamw if r.optimizer == f"adamw_{ADAMW_LRS[0]:g}"), None)
    target = None
    if adamw:
        half = max(step for step, _ in adamw[0].curve) // 2
        target = min(min(loss for step, loss in r.curve if step <= half) for r in adamw)
    rows = []
    for run in runs:
        verdict = run.status
        if verdict == "ok" and reference is not None and run.end > STALL_FACTOR * reference.end \
                and run.end - reference.end > STALL_MARGIN:
            verdict = "stalled"
        rows.append({"model": run.model, "optimizer": run.optimizer, "verdict": verdict, "reason": run.reason,
                     "start": run.start, "best": run.best, "end": run.end, "target": target,
                     "steps_to_target": run.steps_to(target) if target is not None else None,
                     "seconds": run.seconds, "last_step": run.last_step})
    return rows


def table(rows: list[dict], steps: int) -> str:
    """The markdown table of `verdicts` rows."""
    lines = ["| model | optimizer | held-out start | best | end | verdict | steps to target | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reached = "–" if r["target"] is None else (f"> {steps}" if r["steps_to_target"] is None else str(r["steps_to_target"]))
        target = "" if r["target"] is None else f" ({r['target']:.3g})"
        verdict = r["verdict"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['start']:.4g} | {r['best']:.4g} | {r['end']:.4g} | "
                     f"{verdict} | {reached}{target} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, problems: dict[str, Callable[[], Problem]] = PROBLEMS,
         optimizers: tuple[str, ...] = GNFX_OPTIMIZERS, description: str = __doc__,
         models: tuple[str, ...] | None = None) -> None:
    """The command line: train each of `--models` (keys of `problems`; by default `models`, or all)
    with each of `--optimizers` (by default `optimizers` and AdamW at ADAMW_LRS), print and optionally
    write the tables."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the initial weights and the batch stream")
    parser.add_argument("--models", nargs="+", choices=list(problems), default=list(models or problems))
    parser.add_argument("--optimizers", nargs="+",
                        default=[*optimizers, *(f"adamw_{lr:g}" for lr in ADAMW_LRS)])
    parser.add_argument("--out", default=None, help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sections = []
    for name in args.models:
        runs = []
        for optimizer in args.optimizers:
            runs.append(train(name, optimizer, args.steps, args.seed, problems))
            r = runs[-1]
            print(f"{name:<16} {optimizer:<11} {r.status:<8} {r.start:.4f} -> best {r.best:.4f} end {r.end:.4f} "
                  f"({r.seconds:.1f} s) {r.reason}", flush=True)
        sections.append(f"## {name}\n\n{table(verdicts(runs), args.steps)}\n")
        print(sections[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(sections))


if __name__ == "__main__":
    main()
