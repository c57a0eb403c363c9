"""First contact with recommender-system libraries, called as their users call them.

    PYTHONPATH=<deepctr_torch, pytorch_widedeep, torch_rechub>:<stubs of gensim, spacy, cv2>:<torchvision shim>:
        <torchvision>:<pandas>:<requests, ...>:. OMP_NUM_THREADS=1 python -m benchmarks.recsys_probe \
        [--models deepfm dssm] [--optimizers kfac adamw] [--steps 5] [--timeout 300] [--out probe.md]
    ... python -m benchmarks.recsys_probe --time [--steps 12]     # the big-table step time against AdamW's

benchmarks.clip_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 64 rows) for:

- DeepCTR-Torch 0.3.0: `deepfm`, `xdeepfm`, `dcn`, `din` over SparseFeat user (10 000 x 8), item (2 000 x 8),
  category (20 x 8) and DenseFeat price (DIN: a behaviour sequence of 5 items, VarLenSparseFeat sharing the
  item table, history_feature_list=["item"]), the input built as its `fit` builds it (the feature columns
  concatenated into one float tensor), and the step of its `fit` loop written out:
  `F.binary_cross_entropy(model(x), y, reduction="sum") + model.get_regularization_loss()` (its output is a
  sigmoid; its `fit` calls the module itself, so a compiled model is called in this loop, see the results);
- pytorch-widedeep 1.7.0: `wd_tabmlp` (WideDeep(Wide, TabMlp)) and `wd_tabtransformer` (WideDeep(Wide,
  TabTransformer)) from its WidePreprocessor (crossed user x item column) and TabPreprocessor, the loss of its
  Trainer's "binary" objective (`nn.BCEWithLogitsLoss()` on the (N, 1) logits);
- torch-rechub 0.9.0: `dssm` (two towers, its MatchTrainer's in-batch negatives: `user_tower(x) @
  item_tower(x)ᵀ` with every other row's item as a negative, `inbatch_negative_sampling`,
  `gather_inbatch_logits`, cross-entropy at the positive; the towers are methods other than the forward:
  compiled with `methods=["user_tower", "item_tower"]`), `youtube_dnn` (sampled softmax: the positive and 4
  sampled negative items, list-wise cross-entropy), `sasrec` (its pair-wise mode: positive and negative next
  items along a sequence of 8, its BPRLoss of the flattened scores);
- plain torch: `bag` (nn.EmbeddingBag(mode="sum") of offsets with per_sample_weights, 5 000 x 16, under a two
  layer MLP, BCE with logits), `sparse` (nn.Embedding(sparse=True)).

Optimizers: "kfac" at its defaults (loss="binary_cross_entropy" where the users' loss is BCE on one logit a row,
loss="cross_entropy" for YoutubeDNN's sampled softmax: gnfx's models of them; else kfac at its default lr),
"kfac_lr" (lr 1e-3), "shampoo", "diag" at lr 1e-3 and torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the
capture's form, the share of the trainable parameters in curvature blocks, exactness (the kfac_lr rows: float64,
the compiled model beside a copy over 3 steps, the largest |difference| of the loss and of any gradient; then one
statistic step (stat_decay 0, fisher="empirical") against plain hooks on the copy: A and S of every nn.Linear and
nn.Embedding block, relative max gaps, S up to gnfx's row count M), the losses, gnfx's warnings (once each) and the
parameters outside the blocks, the seconds; or the error.

`--time`: DeepFM with a user table of 200 000 x 16 and an item table of 50 000 x 16 (with the first-order
tables of 1 column, 4.25 M parameters) beside a 64-32 MLP (3.6 k), batch 256: the median seconds of steps 3..
(forward, backward and step) of each optimizer against AdamW's, the first step's (with the capture) and the
slowest of steps 3.. (Shampoo's root refresh every 10 steps), and of a plan that gives the tables K-FAC and
the rest Shampoo. None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_12_recsys.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics as stats
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import embedding_factors, hooked_calls, linear_factors
from benchmarks.lockstep import lockstep_gaps

BATCH = 64
DEEPCTR = ("deepfm", "xdeepfm", "dcn", "din")
WIDEDEEP = ("wd_tabmlp", "wd_tabtransformer")
RECHUB = ("dssm", "youtube_dnn", "sasrec")
PLAIN = ("bag", "sparse")
MODELS = (*DEEPCTR, *WIDEDEEP, *RECHUB, *PLAIN)
# kfac's loss= where the users' loss is one gnfx models: BCE with logits on one output a row; YoutubeDNN's
# sampled softmax, the cross-entropy of (N, 1 + negatives) logits at the positive
LOSS = {**dict.fromkeys((*WIDEDEEP, "bag"), "binary_cross_entropy"), "youtube_dnn": "cross_entropy"}
METHODS = {"dssm": ["user_tower", "item_tower"]}  # the trainer calls these, not the forward
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}
# --time only: K-FAC on the tables, Shampoo on the rest (a plan of glob patterns on block names, gnfx.plan)
TABLES_KFAC = ({"*embedding_dict*": "kfac", "*": "shampoo"}, {"lr": 1e-3})


def _import(name: str):
    return library("benchmarks.recsys_probe", name)


def _deepctr(name: str, users: int = 10_000, items: int = 2_000, dim: int = 8, hidden=(16, 8),
             rows: int = BATCH):
    """(model, x: the float tensor DeepCTR's fit builds from the feature columns, y) of a DeepCTR model, `rows`
    examples."""
    _import("deepctr_torch")
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DCN, DIN, DeepFM, xDeepFM
    rng = np.random.default_rng(1)
    columns = [SparseFeat("user", users, embedding_dim=dim), SparseFeat("item", items, embedding_dim=dim),
               SparseFeat("category", 20, embedding_dim=dim), DenseFeat("price", 1)]
    data = {"user": rng.integers(0, users, rows), "item": rng.integers(0, items, rows),
            "category": rng.integers(0, 20, rows), "price": rng.random(rows)}
    if name == "din":
        columns.append(VarLenSparseFeat(SparseFeat("hist_item", items, embedding_dim=dim, embedding_name="item"),
                                        maxlen=5, length_name="seq_length"))
        columns.append(DenseFeat("seq_length", 1))
        data["hist_item"] = rng.integers(1, items, (rows, 5)) * (np.arange(5) < rng.integers(1, 6, (rows, 1)))
        data["seq_length"] = (data["hist_item"] > 0).sum(1)
        model = DIN(columns, ["item"], dnn_hidden_units=hidden, att_hidden_size=(16, 8), device="cpu")
    elif name == "xdeepfm":
        model = xDeepFM(columns, columns, dnn_hidden_units=hidden, cin_layer_size=(8, 8), device="cpu")
    elif name == "dcn":
        model = DCN(columns, columns, cross_num=2, dnn_hidden_units=hidden, device="cpu")
    else:
        model = DeepFM(columns, columns, dnn_hidden_units=hidden, device="cpu")
    x = [np.asarray(data[f]).reshape(rows, -1) for f in model.feature_index]  # fit's concatenation
    dtype = torch.get_default_dtype()  # fit's .float(), float64 for the exactness check
    x = torch.from_numpy(np.concatenate(x, axis=-1)).to(dtype)
    return model, x, torch.from_numpy(rng.integers(0, 2, rows)).to(dtype)


def _widedeep(name: str):
    """(WideDeep model, X dict, y) from pytorch-widedeep's preprocessors on a random frame."""
    pd = _import("pandas")
    _import("pytorch_widedeep")
    from pytorch_widedeep.models import TabMlp, TabTransformer, Wide, WideDeep
    from pytorch_widedeep.preprocessing import TabPreprocessor, WidePreprocessor
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"user": rng.integers(0, 300, BATCH).astype(str), "item": rng.integers(0, 100, BATCH).astype(str),
                       "age": rng.random(BATCH)})
    wide_prep = WidePreprocessor(wide_cols=["user", "item"], crossed_cols=[("user", "item")])
    X_wide = wide_prep.fit_transform(df)
    transformer = name == "wd_tabtransformer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Continuous columns will not be normalised"
        tab_prep = TabPreprocessor(cat_embed_cols=["user", "item"], continuous_cols=["age"],
                                   for_transformer=transformer)
        X_tab = tab_prep.fit_transform(df)
    wide = Wide(input_dim=int(np.unique(X_wide).shape[0]), pred_dim=1)
    if transformer:
        deep = TabTransformer(column_idx=tab_prep.column_idx, cat_embed_input=tab_prep.cat_embed_input,
                              continuous_cols=["age"], input_dim=16, n_heads=2, n_blocks=2)
    else:
        deep = TabMlp(column_idx=tab_prep.column_idx, cat_embed_input=tab_prep.cat_embed_input,
                      continuous_cols=["age"], mlp_hidden_dims=[16, 8])
    dtype = torch.get_default_dtype()
    X = {"wide": torch.from_numpy(X_wide).long(), "deeptabular": torch.from_numpy(X_tab).to(dtype)}
    return WideDeep(wide=wide, deeptabular=deep), X, torch.from_numpy(rng.integers(0, 2, (BATCH, 1))).to(dtype)


def _rechub(name: str):
    """(model, x dict of ids) of a torch-rechub matching model."""
    _import("torch_rechub")
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import DSSM, SASRec, YoutubeDNN
    g = torch.Generator().manual_seed(1)
    users, items = 1_000, 2_000
    if name == "sasrec":
        T = 8
        features = [SequenceFeature(name, items, embed_dim=16, pooling="concat", padding_idx=0,
                                    shared_with=None if name == "seq" else "seq")
                    for name in ("seq", "pos_items", "neg_items")]
        x = {name: torch.randint(1, items, (BATCH, T), generator=g) for name in ("seq", "pos_items", "neg_items")}
        x["seq"][: BATCH // 2, : T // 2] = 0  # left-padded histories
        return SASRec(features, max_len=T, dropout_rate=0.1, num_blocks=2, num_heads=1), x
    user_features = [SparseFeature("user_id", users, embed_dim=16), SparseFeature("age", 10, embed_dim=16)]
    item_features = [SparseFeature("item_id", items, embed_dim=16)]
    x = {"user_id": torch.randint(0, users, (BATCH,), generator=g), "age": torch.randint(0, 10, (BATCH,), generator=g),
         "item_id": torch.randint(0, items, (BATCH,), generator=g)}
    if name == "dssm":
        params = {"dims": [32, 16], "activation": "prelu"}
        return DSSM(user_features, item_features, params, params, temperature=0.02), x
    negatives = [SequenceFeature("neg_items", items, embed_dim=16, pooling="concat", shared_with="item_id")]
    x["neg_items"] = torch.randint(0, items, (BATCH, 4), generator=g)
    return YoutubeDNN(user_features, item_features, negatives, {"dims": [32, 16]}, temperature=0.02), x


class Bag(nn.Module):
    """nn.EmbeddingBag(mode="sum") of 1-D ids with offsets and per_sample_weights, then a two-layer MLP."""

    def __init__(self, vocab: int = 5_000, dim: int = 16):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, ids, offsets, weights):
        return self.mlp(self.bag(ids, offsets, per_sample_weights=weights))


def build(name: str):
    """(model, batch, loss(module, batch, plain)) of `name` (module doc), random weights from the current seed;
    `plain` is the module whose own methods the loss calls (DeepCTR's regularization: the module itself beside a
    compiled model, whose parameters it shares)."""
    if name in DEEPCTR:
        model, x, y = _deepctr(name)
        return model, (x, y), lambda m, b, plain: (F.binary_cross_entropy(m(b[0]).squeeze(-1), b[1], reduction="sum")
                                                   + plain.get_regularization_loss())
    if name in WIDEDEEP:
        model, X, y = _widedeep(name)
        return model, (X, y), lambda m, b, _: F.binary_cross_entropy_with_logits(m(b[0]), b[1])
    if name in RECHUB:
        model, x = _rechub(name)
        from torch_rechub.basic.loss_func import BPRLoss
        from torch_rechub.utils.match import gather_inbatch_logits, inbatch_negative_sampling
        if name == "dssm":
            def in_batch(m, b, _):  # MatchTrainer(in_batch_neg=True, mode=2)'s step
                scores = m.user_tower(b) @ m.item_tower(b).t()
                negatives = inbatch_negative_sampling(scores, generator=torch.Generator().manual_seed(3))
                logits = gather_inbatch_logits(scores, negatives)
                return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
            return model, x, in_batch
        if name == "youtube_dnn":  # list-wise: the positive item at index 0
            return model, x, lambda m, b, _: F.cross_entropy(m(b), torch.zeros(BATCH, dtype=torch.long))
        def bpr(m, b, _):  # each position's positive against its negative next item (BPRLoss of 1-D scores)
            positive, negative = m(b)
            return BPRLoss()(positive.reshape(-1), negative.reshape(-1))
        return model, x, bpr
    g = torch.Generator().manual_seed(1)
    if name == "bag":
        lengths = torch.randint(1, 6, (BATCH,), generator=g)
        ids = torch.randint(0, 5_000, (int(lengths.sum()),), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        batch = (ids, offsets, torch.rand(ids.shape, generator=g, dtype=torch.get_default_dtype()),
                 torch.randint(0, 2, (BATCH, 1), generator=g).to(torch.get_default_dtype()))
        return Bag(), batch, lambda m, b, _: F.binary_cross_entropy_with_logits(m(*b[:3]), b[3])
    model = nn.Sequential(nn.Embedding(1_000, 16, sparse=True), nn.Flatten(), nn.Linear(48, 1))
    batch = (torch.randint(0, 1_000, (BATCH, 3), generator=g),
             torch.randint(0, 2, (BATCH, 1), generator=g).to(torch.get_default_dtype()))
    return model, batch, lambda m, b, _: F.binary_cross_entropy_with_logits(m(b[0]), b[1])


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    if name in METHODS and kind != "adamw":
        hparams = {**hparams, "methods": METHODS[name]}
    return kind, hparams


def _hooked_factor_gaps(c, reference: nn.Module, loss_of) -> str:
    """'A Δ, S Δ (M, blocks)' of one statistic step of `c` (stat_decay 0, fisher="empirical") against plain
    hooks on `reference` (the same parameters): every block that is an nn.Linear (A = E[ā āᵀ]) or an
    nn.Embedding (A = the ids' frequencies), S = M Σ g gᵀ with gnfx's row count M read off the traces."""
    modules = dict(reference.named_modules())
    torch.manual_seed(7)
    loss_of(c).backward()  # (the first call captures: c.layers after it)
    names = [b.name for b in c.layers if isinstance(modules.get(b.name), (nn.Linear, nn.Embedding))]
    torch.manual_seed(7)
    with hooked_calls(reference, names) as records:
        loss_of(reference).backward()
    c.step()
    a_gap = s_gap = 0.0
    rows = set()
    names = [n for n in names if any(g is not None for _, g in records[n])]  # (a Linear called as a module)
    for n in names:
        if isinstance(modules[n], nn.Linear):
            A, gg = linear_factors(records[n], modules[n].bias is not None)
        else:
            A, gg = embedding_factors(records[n], modules[n].num_embeddings)
        got = c.statistics(n)
        M = (got["S"].trace() / gg.trace()).item()
        rows.add(f"{M:.4g}")
        a_gap = max(a_gap, ((got["A"] - A).abs().max() / A.abs().max()).item())
        s_gap = max(s_gap, ((got["S"] - M * gg).abs().max() / got["S"].abs().max()).item())
    return f"A {a_gap:.0e}, S {s_gap:.0e} (M {'/'.join(sorted(rows))}, {len(names)} Linear/Embedding)"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ (M, blocks)': module doc."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, batch, loss_of = build(name)
        model = model.double()
        reference = copy.deepcopy(model)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, plain: loss_of(m, batch, plain), 3, seed=100)
        torch.manual_seed(0)
        model, batch, loss_of = build(name)
        model = model.double()
        reference = copy.deepcopy(model)
        c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0, fisher="empirical",
                         methods=METHODS.get(name, []))
        return f"{loss_gap:.0e}, {grad_gap:.0e}; " + _hooked_factor_gaps(
            c, reference, lambda m: loss_of(m, batch, model if m is c else reference))
    finally:
        torch.set_default_dtype(torch.float32)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model, batch, loss_of = build(name)
        return model.train(), lambda c: loss_of(c, batch, model)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made)


def step_times(steps: int) -> None:
    """`--time` (module doc): a markdown table of the median step seconds of each optimizer and its ratio to
    AdamW's, on the big-table DeepFM."""
    torch.set_num_threads(1)
    print("| optimizer | in blocks | losses | first step s | median step s | / AdamW | slowest of steps 3.. s |\n"
          "|---|---|---|---|---|---|---|")
    adamw = None
    for optimizer in ("adamw", "kfac", "diag", "shampoo", "tables kfac, rest shampoo"):
        kind, hparams = TABLES_KFAC if optimizer.startswith("tables") else settings("deepfm", optimizer)
        torch.manual_seed(0)
        model, x, y = _deepctr("deepfm", users=200_000, items=50_000, dim=16, hidden=(64, 32), rows=256)
        if kind == "adamw":
            c, opt, share = model, torch.optim.AdamW(model.parameters(), **hparams), "–"
        else:
            c = opt = gnfx.compile(model, kind, **hparams)
        seconds, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            loss = F.binary_cross_entropy(c(x).squeeze(-1), y, reduction="sum") + model.get_regularization_loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
            seconds.append(time.perf_counter() - start)
            losses.append(f"{loss.item():.4g}")
        median = stats.median(seconds[2:])
        adamw = adamw or median
        if kind != "adamw":
            covered, total = c.layers.coverage(dict(model.named_parameters()))
            share = f"{100 * covered / total:.1f}%"
        print(f"| {optimizer} | {share} | {', '.join(losses)} | {seconds[0]:.2f} | {median:.3f} | "
              f"{median / adamw:.2f} | {max(seconds[2:]):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--steps", type=int, default=12)  # --time's (the table's: probe_main's)
    known, _ = parser.parse_known_args()
    if known.time:
        step_times(known.steps)
        return
    probe_main(__doc__, "benchmarks.recsys_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad; statistics (float64) | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=5, timeout=300)


if __name__ == "__main__":
    main()
