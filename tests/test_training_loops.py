"""The generated step in training loops gnfx does not own: Hugging Face's `Trainer` and PyTorch
Lightning's `Trainer`, each driving `model.optimizer` itself.

A tiny transformers GPT-2 (built from a config, no downloads), compiled lazily (captured at the
trainer's first training call), learns a sequence whose every odd token is the previous token
plus one. Each trainer runs a fixed number of full-batch steps; then every step was taken, the
statistics of every statistic step reached the curvature blocks, and the loss on the data fell.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import gnfx

transformers = pytest.importorskip("transformers")

VOCAB, ROWS, T, STEPS, STAT_EVERY = 32, 8, 8, 8, 2
BLOCK = "transformer.h.0.mlp.c_fc"


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def sequences() -> torch.Tensor:
    """(ROWS, T) token ids; every odd position is the token before it plus one (learnable)."""
    ids = torch.randint(0, VOCAB, (ROWS, T), generator=torch.Generator().manual_seed(0))
    ids[:, 1::2] = (ids[:, ::2] + 1) % VOCAB
    return ids


@torch.no_grad()
def loss_on_data(lm) -> float:
    """The language-model loss of the original module (whose parameters the gnfx model trains)."""
    ids = sequences()
    return lm(input_ids=ids, labels=ids).loss.item()


def assert_trained(model, lm, before: float) -> None:
    opt = model.optimizer
    assert opt.steps == STEPS and opt.skipped_steps == 0
    assert opt.statistics[BLOCK].updates == STEPS // STAT_EVERY  # every statistic step reached the block
    assert set(model.statistics(BLOCK)) == {"A", "S"}
    after = loss_on_data(lm)
    assert after < 0.8 * before, (before, after)


def test_hugging_face_trainer(tmp_path):
    """`Trainer(model=gnfx_model, optimizers=(model.optimizer, None))`: accelerate wraps the optimizer
    (AcceleratedOptimizer), the Trainer builds its default LR schedule on it and keeps the dataset
    columns the original forward names."""
    pytest.importorskip("accelerate")
    lm = gpt2()
    model = gnfx.compile(lm, optimizer="kfac", lr=1e-2, stat_every=STAT_EVERY)
    before = loss_on_data(lm)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=ROWS,
                                          max_steps=STEPS, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in sequences()]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(model.optimizer, None))
    assert inspect.signature(model.forward) == inspect.signature(lm.forward)
    trainer.train()
    assert trainer.optimizer.optimizer is model.optimizer  # driven through accelerate's wrapper
    assert_trained(model, lm, before)


def test_lightning_trainer():
    """`configure_optimizers` returns `model.optimizer`; Lightning's automatic optimization calls
    `optimizer.step(closure)`, whose closure runs the forward (the lazy capture, at the first
    step), `zero_grad` and the backward."""
    lightning = pytest.importorskip("lightning")

    class LanguageModel(lightning.LightningModule):
        def __init__(self, lm):
            super().__init__()
            self.model = gnfx.compile(lm, optimizer="kfac", lr=1e-2, stat_every=STAT_EVERY)

        def training_step(self, ids, index):
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return self.model.optimizer

    lm = gpt2()
    module = LanguageModel(lm)
    before = loss_on_data(lm)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(sequences(), batch_size=ROWS))
    assert_trained(module.model, lm, before)


def test_a_closure_may_make_the_first_call():
    """`optimizer.step(closure)` runs the closure first, so its forward may be the lazy capture;
    a step before any call and without a closure has no plan to run and says so."""
    lm = gpt2()
    model = gnfx.compile(lm, optimizer="kfac", lr=1e-2)
    with pytest.raises(gnfx.GnfxError, match="before the model's first call"):
        model.optimizer.step()
    ids = sequences()

    def closure():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    loss = model.optimizer.step(closure)
    assert model.optimizer.steps == 1 and loss.item() > loss_on_data(lm)
