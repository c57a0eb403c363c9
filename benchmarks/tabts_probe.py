"""First contact with tabular and time-series libraries and with frameworks that build the optimizer themselves.

    PYTHONPATH=<fastai, fastcore, fasttransform, fastprogress 1.0.3, skorch, pytorch_tabnet,
        rtdl_revisiting_models>:<pandas, fastdownload, tabulate, plum-dispatch 2.9, beartype, ...>:<requests, ...>:. \
        MPLBACKEND=Agg OMP_NUM_THREADS=1 python -m benchmarks.tabts_probe \
        [--models fastai_tabular patchtst] [--optimizers kfac adamw] [--steps 6] [--timeout 300] [--out probe.md]

benchmarks.clip_probe's first contact (one model and optimizer per process, random weights, train mode) for:

- fastai 2.8: `fastai_tabular`, `tabular_learner(dls, layers=[32, 16])` on a synthetic DataFrame (3 continuous,
  2 categorical columns, 3 classes; `TabularDataLoaders.from_df` with Categorify and Normalize), its TabularModel
  compiled and handed back as fastai users hand any torch optimizer: `learn.model = gnfx.compile(learn.model,
  ...)`, `learn.opt_func = partial(OptimWrapper, opt=learn.model.optimizer_for)`, trained by
  `learn.fit_one_cycle(1, lr)` (fastai's schedule of lr and of momentum, `mom`: betas[0]); the loss is the
  learner's CrossEntropyLossFlat;
- skorch 1.4: `skorch_mlp`, `NeuralNetClassifier(compiled, criterion=nn.CrossEntropyLoss,
  optimizer=compiled.optimizer_for, lr=..., max_epochs=1, train_split=None)` over a two-layer MLP with dropout,
  `net.fit(X, y)` (skorch builds the optimizer as `optimizer(param_groups, lr=lr)`);
- Hugging Face transformers' time-series models (tiny configs: d_model 16, 2 layers, 3 channels or one series,
  context 32 (PatchTST) or 16 with lags [1, 2, 3] and 2 time features, horizon 8), trained as their docs do,
  `model(past_values=..., past_time_features=..., past_observed_mask=..., future_values=...,
  future_time_features=...).loss.backward()`: `patchtst` (PatchTSTForPrediction, MSE), `patchtst_cls`
  (PatchTSTForClassification, cross-entropy), `tst` (TimeSeriesTransformerForPrediction), `informer`,
  `autoformer` (the last three: a Student-t distribution head, the loss its negative log-likelihood);
- pytorch-tabnet 4.1: `tabnet`, TabNetClassifier's own `fit` (virtual_batch_size 16: ghost batch norm;
  sparsemax masks; its loss: cross-entropy minus lambda_sparse x the masks' entropy), with the network
  compiled in a subclass's `_set_network` and `optimizer_fn=<the compiled network>.optimizer_for`;
- rtdl_revisiting_models 0.0.2: `ft_transformer` (FTTransformer with get_default_kwargs(n_blocks=2), its own
  param groups `make_parameter_groups()` handed to `optimizer_for` with weight decay 1e-5 where it decays),
  `rtdl_mlp`, `rtdl_resnet`, cross-entropy in a plain loop.

Optimizers: "kfac" at its defaults (with loss= where the users' loss is one gnfx models: cross-entropy for the
tabular models and patchtst_cls, mse for patchtst; none for the distribution heads), "kfac_loss" (the time-series
models with loss="mse": what gnfx does with an NLL it is told is a squared error), "kfac_lr" (lr 1e-3), "shampoo",
"diag" and "auto" at lr 1e-3, and torch.optim.AdamW at lr 1e-3 ("adamw", through the same framework). A framework
run takes the optimizer's lr (fastai's lr_max, skorch's lr; kfac at its defaults: 1e-3, which its quadratic step
rescales). Per run: the capture's form, the share of the trainable parameters in curvature blocks, exactness (the
kfac_lr rows: float64, the compiled model beside a second build of the same seed over 3 steps of a plain loop, the
largest |difference| of the loss and of any gradient; and K-FAC's A and S of every Linear block after one step at
stat_decay 0, fisher="empirical", against plain hooks on the reference: relative max gaps, S up to gnfx's row count
M, which is printed), the losses, gnfx's warnings (once each), the parameters outside the blocks, the seconds; or
the error. None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_11_tabts.md.
"""
from __future__ import annotations

import copy
import functools
import random
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import lockstep_gaps

BATCH, FEATURES, CLASSES = 16, 5, 3
CHANNELS, CONTEXT, HORIZON, LAGS, TIME_FEATURES = 3, 32, 8, [1, 2, 3], 2
FRAMEWORKS = ("fastai_tabular", "skorch_mlp", "tabnet")  # trained by the library's own fit
SERIES = ("patchtst", "patchtst_cls", "tst", "informer", "autoformer")
TABLES = ("ft_transformer", "rtdl_mlp", "rtdl_resnet")
MODELS = (*FRAMEWORKS, *SERIES, *TABLES)
FLOAT32_ONLY = ("autoformer",)  # its decomposition layers make float32 tensors: the plain model fails in float64
LOSS = {**{m: "cross_entropy" for m in (*FRAMEWORKS, *TABLES, "patchtst_cls")}, "patchtst": "mse"}
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_loss": ("kfac", {"loss": "mse"}), "kfac_lr": ("kfac", {"lr": 1e-3}),
              "shampoo": ("shampoo", {"lr": 1e-3}), "diag": ("diag", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference
LR = 1e-3  # a framework's lr where the optimizer takes none (kfac's quadratic step)


def _import(name: str):
    return library("benchmarks.tabts_probe", name)


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    _import("numpy").random.seed(seed)


def _table(rows: int, dtype=torch.float32):
    """(continuous (rows, FEATURES), categorical (rows, 2) codes in [0, 4), labels (rows,)): the class of a
    fixed random projection of the continuous columns, moved by the first categorical one."""
    g = torch.Generator().manual_seed(1)
    cont = torch.randn(rows, FEATURES, generator=g, dtype=dtype)
    cat = torch.randint(0, 4, (rows, 2), generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=g, dtype=dtype)
    y = (cont @ w + F.one_hot(cat[:, 0] % CLASSES, CLASSES).to(dtype)).argmax(1)
    return cont, cat, y


def _fastai_dls(rows: int):
    pd = _import("pandas")
    tabular = _import("fastai.tabular.all")
    cont, cat, y = _table(rows + BATCH)
    df = pd.DataFrame({**{f"x{i}": cont[:, i].numpy() for i in range(FEATURES)},
                       **{f"c{i}": cat[:, i].numpy().astype(str) for i in range(2)}, "y": y.numpy()})
    return tabular.TabularDataLoaders.from_df(
        df, procs=[tabular.Categorify, tabular.Normalize], cat_names=["c0", "c1"],
        cont_names=[f"x{i}" for i in range(FEATURES)], y_names="y", y_block=tabular.CategoryBlock(),
        valid_idx=list(range(rows, rows + BATCH)), bs=BATCH, shuffle=True)


class _Skorch(nn.Module):  # the MLP of skorch's README
    def __init__(self):
        super().__init__()
        self.dense0, self.dense1, self.output = nn.Linear(FEATURES, 32), nn.Linear(32, 16), nn.Linear(16, CLASSES)
        self.dropout = nn.Dropout(0.1)

    def forward(self, X):
        return self.output(F.relu(self.dense1(self.dropout(F.relu(self.dense0(X))))))


def _series_config(name: str):
    tr = _import("transformers")
    small = {"d_model": 16, "num_attention_heads": 2, "num_hidden_layers": 2, "ffn_dim": 32}
    if name.startswith("patchtst"):
        return tr.PatchTSTConfig(num_input_channels=CHANNELS, context_length=CONTEXT, prediction_length=HORIZON,
                                 patch_length=8, patch_stride=8, num_targets=CLASSES, **small)
    config = {"tst": tr.TimeSeriesTransformerConfig, "informer": tr.InformerConfig,
              "autoformer": tr.AutoformerConfig}[name]
    return config(prediction_length=HORIZON, context_length=16, lags_sequence=LAGS, num_time_features=TIME_FEATURES,
                  d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "fastai_tabular":
        return _import("fastai.tabular.all").tabular_learner(_fastai_dls(BATCH), layers=[32, 16]).model
    if name == "skorch_mlp":
        return _Skorch()
    if name == "tabnet":
        groups = _import("pytorch_tabnet.utils").create_group_matrix([], FEATURES)  # as TabNetClassifier's fit
        return _import("pytorch_tabnet.tab_network").TabNet(FEATURES, CLASSES, n_d=8, n_a=8, n_steps=3,
                                                             virtual_batch_size=BATCH // 2,
                                                             group_attention_matrix=groups)
    if name in SERIES:
        tr = _import("transformers")
        cls = {"patchtst": tr.PatchTSTForPrediction, "patchtst_cls": tr.PatchTSTForClassification,
               "tst": tr.TimeSeriesTransformerForPrediction, "informer": tr.InformerForPrediction,
               "autoformer": tr.AutoformerForPrediction}[name]
        return cls(_series_config(name))
    rtdl = _import("rtdl_revisiting_models")
    if name == "ft_transformer":
        return rtdl.FTTransformer(n_cont_features=FEATURES, cat_cardinalities=[4, 4], d_out=CLASSES,
                                  **rtdl.FTTransformer.get_default_kwargs(n_blocks=2))
    if name == "rtdl_mlp":
        return rtdl.MLP(d_in=FEATURES, d_out=CLASSES, n_blocks=2, d_block=32, dropout=0.1)
    return rtdl.ResNet(d_in=FEATURES, d_out=CLASSES, n_blocks=2, d_block=32, d_hidden_multiplier=2.0,
                       dropout1=0.1, dropout2=0.0)


def problem(name: str, step: int = 0, dtype=torch.float32):
    """(batch `step`, loss(model, batch)) of `name` as a plain loop trains it (module doc; for the frameworks,
    the loss their fit computes)."""
    g = torch.Generator().manual_seed(10 + step)
    if name in SERIES:
        if name.startswith("patchtst"):
            batch = {"past_values": torch.randn(BATCH, CONTEXT, CHANNELS, generator=g, dtype=dtype)}
            batch.update({"target_values": torch.randint(0, CLASSES, (BATCH,), generator=g)} if name == "patchtst_cls"
                         else {"future_values": torch.randn(BATCH, HORIZON, CHANNELS, generator=g, dtype=dtype)})
        else:
            past = 16 + max(LAGS)
            t = torch.arange(past + HORIZON, dtype=dtype)
            series = torch.sin(t / 3 + torch.rand(BATCH, 1, generator=g, dtype=dtype) * 6) + 0.1 * torch.randn(
                BATCH, past + HORIZON, generator=g, dtype=dtype)
            features = torch.stack([torch.sin(t / 5), torch.cos(t / 5)], -1).expand(BATCH, -1, -1)
            batch = {"past_values": series[:, :past], "past_time_features": features[:, :past],
                     "past_observed_mask": torch.ones(BATCH, past, dtype=dtype), "future_values": series[:, past:],
                     "future_time_features": features[:, past:]}
        return batch, lambda m, b: m(**b).loss
    cont, cat, y = _table(BATCH * (step + 1), dtype)
    cont, cat, y = cont[-BATCH:], cat[-BATCH:], y[-BATCH:]
    if name == "fastai_tabular":
        return (cat, cont, y), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2])
    if name == "tabnet":
        def tabnet_loss(m, b):
            out, sparsity = m(b[0])
            return F.cross_entropy(out, b[1]) - 1e-3 * sparsity
        return (cont, y), tabnet_loss
    if name == "ft_transformer":
        return (cont, cat, y), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2])
    return (cont, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    return kind, hparams


def _factors(reference: nn.Module, names: list[str], batch, loss_of) -> tuple[torch.Tensor, dict]:
    """The reference's loss and, for each Linear `names`, A = E[a aᵀ] over its input rows ([a 1] with a bias)
    and Σ g gᵀ of the loss's gradients g at its output rows, from plain hooks."""
    modules = dict(reference.named_modules())
    with hooked_calls(reference, names) as records:
        loss = loss_of(reference, batch)
        loss.backward()
    factors = {}
    for n, calls in records.items():
        factors[n] = linear_factors(calls, modules[n].bias is not None)
    return loss, factors


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ (M)': module doc (in float32 for a model that cannot run in float64)."""
    dtype = torch.float32 if name in FLOAT32_ONLY else torch.float64
    torch.set_default_dtype(dtype)
    try:
        _seed()
        model = build(name).to(dtype)
        reference = copy.deepcopy(model)
        batch, loss_of = problem(name, dtype=dtype)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m, batch), 3, seed=100)
        _seed()
        model = build(name).to(dtype)
        reference = copy.deepcopy(model)
        c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0, fisher="empirical")
        torch.manual_seed(7)
        loss_of(c, batch).backward()
        modules = dict(reference.named_modules())
        linear = [b.name for b in c.layers.blocks if isinstance(modules.get(b.name), nn.Linear)]
        torch.manual_seed(7)
        _, factors = _factors(reference, linear, batch, loss_of)
        c.step()
        a_gap = s_gap = 0.0
        rows = set()
        for n, (A, S_sum) in factors.items():
            stats = c.statistics(n)
            a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
            M = (stats["S"].trace() / S_sum.trace()).item()  # gnfx's S = M Σ g gᵀ: its row count M
            rows.add(f"{M:.4g}")
            s_gap = max(s_gap, ((stats["S"] - M * S_sum).abs().max() / stats["S"].abs().max()).item())
        return (f"{loss_gap:.0e}, {grad_gap:.0e}; A {a_gap:.0e}, S {s_gap:.0e} (M {'/'.join(sorted(rows))}, "
                f"{len(factors)} Linear{', float32' if dtype == torch.float32 else ''})")
    finally:
        torch.set_default_dtype(torch.float32)


class _Losses:
    """The training losses a framework's fit reports, one per batch."""

    def __init__(self):
        self.values = []


def fit_fastai(c, kind: str, hparams: dict, steps: int, losses: _Losses) -> None:
    fastai = _import("fastai.tabular.all")
    learn = fastai.tabular_learner(_fastai_dls(steps * BATCH), layers=[32, 16])
    learn.model = c
    opt = torch.optim.AdamW if kind == "adamw" else c.optimizer_for
    learn.opt_func = functools.partial(fastai.OptimWrapper, opt=opt)

    class Record(fastai.Callback):
        def after_batch(self):
            if self.training:
                losses.values.append(self.learn.loss.item())
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, hparams.get("lr", LR), cbs=Record())


def fit_skorch(c, kind: str, hparams: dict, steps: int, losses: _Losses) -> None:
    skorch = _import("skorch")
    cont, _, y = _table(steps * BATCH)
    net = skorch.NeuralNetClassifier(c, criterion=nn.CrossEntropyLoss, max_epochs=1, batch_size=BATCH,
                                     optimizer=torch.optim.AdamW if kind == "adamw" else c.optimizer_for,
                                     lr=hparams.get("lr", LR), train_split=None, verbose=0)
    net.fit(cont.numpy(), y.numpy())
    losses.values += net.history[-1, "batches", :, "train_loss"]


def fit_tabnet(kind: str, hparams: dict, steps: int, losses: _Losses):
    tab_model = _import("pytorch_tabnet.tab_model")

    class GnfxTabNet(tab_model.TabNetClassifier):  # the network is built inside fit: compiled there
        def _set_network(self):
            super()._set_network()
            if kind != "adamw":
                self.network = gnfx.compile(self.network, kind, **hparams)
                self.optimizer_fn = self.network.optimizer_for
                self.optimizer_params = {"lr": hparams.get("lr", LR)}

    model = GnfxTabNet(n_d=8, n_a=8, n_steps=3, seed=0, verbose=0, optimizer_fn=torch.optim.AdamW,
                       optimizer_params={"lr": hparams.get("lr", LR)})
    cont, _, y = _table(steps * BATCH)
    model.fit(cont.numpy(), y.numpy(), max_epochs=1, batch_size=BATCH, virtual_batch_size=BATCH // 2,
              drop_last=False, callbacks=[_BatchLosses(losses)], compute_importance=False)
    return model.network


def _BatchLosses(losses: _Losses):
    callbacks = _import("pytorch_tabnet.callbacks")

    class BatchLosses(callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            losses.values.append(logs["loss"])
    return BatchLosses()


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name`."""
    kind, hparams = settings(name, optimizer)
    torch.set_num_threads(1)
    start, losses, error = time.time(), _Losses(), ""
    c = model = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exact = exactness(name, kind, hparams) if optimizer == "kfac_lr" else "–"
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact = "error"
            error = f"exactness: {type(exc).__name__}: {exc}"
        _seed()
        try:
            if name == "tabnet":
                c = fit_tabnet(kind, hparams, steps, losses)
                model = c._model if kind != "adamw" else c
            else:
                model = build(name).train()
                c = model if kind == "adamw" else gnfx.compile(model, kind, **hparams)
                if name == "fastai_tabular":
                    fit_fastai(c, kind, hparams, steps, losses)
                elif name == "skorch_mlp":
                    fit_skorch(c, kind, hparams, steps, losses)
                else:
                    if kind == "adamw":
                        step = torch.optim.AdamW(model.parameters(), **hparams)
                    elif name == "ft_transformer":  # rtdl's own groups (no weight decay on embeddings, norms, biases)
                        step = c.optimizer_for(model.make_parameter_groups(), weight_decay=1e-5)
                    else:
                        step = c.optimizer
                    for i in range(steps):
                        batch, loss_of = problem(name, i)
                        loss = loss_of(c, batch)
                        loss.backward()
                        step.step()
                        step.zero_grad()
                        losses.values.append(loss.item())
        except Exception as exc:  # noqa: BLE001
            error = (error + "; " if error else "") + f"{type(exc).__name__}: {exc}"
    form, blocks, outside = capture_cells(c, model)
    said = gnfx_warnings(caught, 200)
    setting = ", ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults"
    shown = losses.values if len(losses.values) <= 6 else losses.values[:3] + losses.values[-3:]
    text = ", ".join(f"{v:.3g}" for v in shown[:3]) + (" … " + ", ".join(f"{v:.3g}" for v in shown[3:])
                                                       if len(shown) > 3 else "")
    return (f"| {name} | {optimizer} ({setting}) | {form} | {blocks} | {exact} | {text or '–'} | "
            f"{cell(outside, 300)} | {'; '.join(said) or '–'} | {cell(error, 600) or '–'} | "
            f"{time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.tabts_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad; A, S (float64) | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=6, timeout=300,
               # kfac_loss (loss="mse") for the time-series models only
               chosen=lambda name, optimizer, given: optimizer != "kfac_loss" or given or name in SERIES)


if __name__ == "__main__":
    main()
