"""Models trained on a weighted sum of the losses of several outputs, with loss= naming each (gnfx.output_losses).

    OMP_NUM_THREADS=1 PYTHONPATH=TORCHVISION_DIR:. python -m benchmarks.several_outputs [--steps 60] \
        [--models googlenet bert_pretraining] [--optimizers kfac adamw_0.001] [--out tables.md]

benchmarks.library_models' design (its Problem, train, verdicts, table and command line) on two models of
the libraries whose training loss is a sum over outputs, each gnfx optimizer compiled as
`gnfx.compile(model, optimizer=NAME, loss=LOSSES)` with nothing else, and AdamW at lr 1e-3 and 3e-3:

- `googlenet`: torchvision's GoogLeNet built with its auxiliary classifiers (`aux_logits=True`, 10 classes,
  random weights), which in training mode returns GoogLeNetOutputs(logits, aux_logits2, aux_logits1),
  trained as torchvision's reference script trains it, `ce(logits) + 0.3·ce(aux2) + 0.3·ce(aux1)`:
  loss=("cross_entropy", ("cross_entropy", 0.3), ("cross_entropy", 0.3)), on the upsampled digits of
  benchmarks.torchvision_models. The held-out loss is the eval-mode model's, the logits' alone.
- `bert_pretraining`: Hugging Face's BertForPreTraining (a small config from random weights), its
  (prediction_logits, seq_relationship_logits) trained with the masked-token cross-entropy (labels -100
  off the masked tokens) plus the next-sentence one: loss=("cross_entropy", "cross_entropy"). The task:
  sequences whose second half repeats the first (next sentence) or is random (not), 2 of 12 tokens masked.

Before gnfx.output_losses neither could take loss= at all: the backward reached a second output and raised.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import library_models, torchvision_models

GNFX_OPTIMIZERS = ("kfac", "ekfac")
GOOGLENET_LOSSES = ("cross_entropy", ("cross_entropy", 0.3), ("cross_entropy", 0.3))
VOCABULARY, LENGTH, MASK_ID = 20, 12, 1  # token ids 2.. are words, 1 is [MASK], 0 is padding (unused)


def _googlenet_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    if isinstance(out, torch.Tensor):  # eval mode: the logits alone
        return F.cross_entropy(out, y)
    return F.cross_entropy(out.logits, y) + 0.3 * F.cross_entropy(out.aux_logits2, y) + \
        0.3 * F.cross_entropy(out.aux_logits1, y)


def _googlenet_problem() -> library_models.Problem:
    models = torchvision_models.torchvision_or_exit()
    problem = library_models.digits_problem(
        lambda: models.googlenet(num_classes=10, aux_logits=True, init_weights=True),
        torchvision_models.upsampled_digits, torchvision_models.NORM_BATCHES)
    problem.loss, problem.loss_name = _googlenet_loss, GOOGLENET_LOSSES
    return problem


def _pretraining_batch(generator: torch.Generator, count: int) -> dict[str, torch.Tensor]:
    """Sequences of LENGTH words whose second half repeats the first (next-sentence label 0, "is next") or
    is drawn anew (1); two tokens of each sequence masked, their words the masked-token labels."""
    half = LENGTH // 2
    first = torch.randint(2, VOCABULARY, (count, half), generator=generator)
    random_next = torch.randint(2, (count,), generator=generator)
    second = torch.where(random_next[:, None].bool(), torch.randint(2, VOCABULARY, (count, half), generator=generator),
                         first)
    words = torch.cat([first, second], 1)
    positions = torch.rand(count, LENGTH, generator=generator).argsort(1)[:, :2]
    masked = torch.zeros_like(words, dtype=torch.bool).scatter_(1, positions, True)
    return {"input_ids": words.masked_fill(masked, MASK_ID),
            "token_type_ids": (torch.arange(LENGTH) >= half).long().expand(count, -1),
            "labels": words.masked_fill(~masked, -100), "next_sentence_label": random_next}


def _pretraining_loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    return F.cross_entropy(out.prediction_logits.flatten(0, 1), batch["labels"].flatten()) + \
        F.cross_entropy(out.seq_relationship_logits, batch["next_sentence_label"])


def _bert_pretraining() -> nn.Module:
    from transformers import BertConfig, BertForPreTraining
    config = BertConfig(vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForPreTraining(config)


def _pretraining_problem() -> library_models.Problem:
    def stream(seed: int) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(seed + 1)
        while True:
            yield _pretraining_batch(generator, library_models.BATCH)
    return library_models.Problem(_bert_pretraining, _pretraining_loss, stream,
                                  _pretraining_batch(torch.Generator().manual_seed(10_000), 256),
                                  loss_name=("cross_entropy", "cross_entropy"))


PROBLEMS = {"googlenet": _googlenet_problem, "bert_pretraining": _pretraining_problem}


def main(argv: list[str] | None = None) -> None:
    library_models.main(argv, PROBLEMS, GNFX_OPTIMIZERS, __doc__)


if __name__ == "__main__":
    main()
