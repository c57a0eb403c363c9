"""First contact with flair, pytorch-crf and sentence-transformers' pair and triplet losses, called as their users call them.

    PYTHONPATH=<flair, torchcrf>:<flair's pure-python dependencies>:<sentence_transformers>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.nlp_probe [--models crf_packed flair_tagger] [--optimizers kfac adamw] [--steps 4] \
        [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 8 random sentences of 3-9 words) for:

- pytorch-crf (`torchcrf.CRF`, its transitions, start and end scores parameters of the model) as the loss head
  of a tagger whose forward returns the negative log-likelihood of the gold tags, `-self.crf(emissions, tags,
  mask)` (the forward algorithm's log-partition minus the gold path's score, torchcrf's default reduction the
  sum over the sentences): `crf_packed` (nn.Embedding, a bidirectional nn.LSTM on
  `pack_padded_sequence(..., enforce_sorted=False)` and `pad_packed_sequence`, nn.Linear to the emissions),
  `crf_padded` (the same LSTM on the padded batch, reduction="mean"), `bert_crf` (a tiny BertModel, width 32
  and 2 layers, nn.Linear to the emissions, the CRF with reduction="mean" over the attention mask: token
  classification with a CRF as allennlp-style span taggers build it from Hugging Face);
- flair 0.15.1: `flair_tagger` (`SequenceTagger(use_crf=True)`: OneHotEmbeddings of the corpus and
  CharacterEmbeddings, a character BiLSTM on each sentence's words packed by length, stacked; embedding2nn,
  a BiLSTM on the packed sentences, nn.Linear and flair's CRF, whose `transitions` is a parameter added to
  every emission, and its ViterbiLoss, the summed negative log-likelihood) and `flair_classifier`
  (`TextClassifier` on `DocumentRNNEmbeddings` of the same word embeddings: a GRU on the packed sentences,
  the summed cross-entropy); trained as flair's ModelTrainer does, `loss, count = model.forward_loss(batch)`,
  backward, step, the sentences' embeddings cleared (`store_embeddings(batch, "none")`). gnfx compiles them
  with `methods=["forward_loss"]` (the trainer calls that method; its inputs are flair Sentences);
  the "trainer" rows run flair's own `ModelTrainer(model, corpus).train(..., optimizer=compiled.optimizer_for)`
  with `model.forward_loss = compiled.forward_loss` (flair builds `optimizer(params=model.parameters(),
  lr=learning_rate)`, one epoch of one batch per step);
- sentence-transformers 6.2.0 (`SentenceTransformer(modules=[Transformer(tiny BERT), Pooling("mean")])`,
  benchmarks.clip_probe's tiny BERT): `st_cosent` with CoSENTLoss (log-sum-exp over every pair of pairs in
  the batch whose scores are ordered: each pair's loss depends on every other pair), `st_triplet` with
  TripletLoss (anchor, positive and negative: three forwards, one backward), `st_cached_mnrl` with
  CachedMultipleNegativesRankingLoss (GradCache: the embeddings without gradients first, the in-batch
  cross-entropy's gradient at them, then each mini-batch of 4 forwarded again and backpropagated from that
  gradient inside the loss's backward).

Optimizers: "kfac" at its defaults (no loss=: none of these losses is one gnfx models; its default lr),
"kfac_lr" (lr 1e-3), "shampoo", "diag" at lr 1e-3, "trainer" (flair's models only: kfac at lr 1e-3 through
flair's ModelTrainer) and for reference torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the
share of the trainable parameters in curvature blocks, exactness (the kfac_lr runs, float64: the compiled
model beside a second build from the same seed over 3 steps, benchmarks.lockstep, the largest |difference| of
the loss and of any gradient; and the first step's K-FAC A and S of every nn.Linear and nn.Embedding block (but
an embedding read by every example, BERT's positions) against forward and gradient hooks on every call, flair's
`embedding_layer.forward(ids)` included, benchmarks.hooked_calls: A's largest gap relative to its largest entry, and m,
the factor S = m Σ g gᵀ by which gnfx's S is the hooks' Σ g gᵀ, fitted over the blocks, with the largest
relative gap of that fit), the losses, gnfx's warnings (once each) and the parameters outside the blocks,
the seconds; or the error. None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_12_nlp.md.
"""
from __future__ import annotations

import tempfile

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, one_batch_row, probe_main
from benchmarks.hooked_calls import embedding_factors, hooked_calls, linear_factors
from benchmarks.lockstep import float64_gaps

BATCH, WORDS, TAGS, VOCAB = 8, 9, 4, 40
CRF = ("crf_packed", "crf_padded", "bert_crf")
FLAIR = ("flair_tagger", "flair_classifier")
SENTENCE = ("st_cosent", "st_triplet", "st_cached_mnrl")
MODELS = (*CRF, *FLAIR, *SENTENCE)
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "trainer": ("kfac", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    if name == "flair":  # flair 0.15.1 imports a class transformers 5 removed (its LayoutLM embeddings only)
        transformers = library("benchmarks.nlp_probe", "transformers")
        if not hasattr(transformers, "LayoutLMv2FeatureExtractor"):
            transformers.LayoutLMv2FeatureExtractor = type("LayoutLMv2FeatureExtractor", (), {})
        for part in ("datasets", "embeddings", "models", "trainers", "training_utils"):
            library("benchmarks.nlp_probe", f"flair.{part}")
    return library("benchmarks.nlp_probe", name)


class CRFTagger(nn.Module):
    """Embedding, bidirectional LSTM (on packed sequences if `packed`), linear emissions, torchcrf.CRF: the
    forward returns the negative log-likelihood of `tags` (torchcrf's `reduction`)."""

    def __init__(self, packed: bool, reduction: str):
        super().__init__()
        self.packed, self.reduction = packed, reduction
        self.embedding = nn.Embedding(VOCAB + 1, 16, padding_idx=0)
        self.lstm = nn.LSTM(16, 16, batch_first=True, bidirectional=True)
        self.emissions = nn.Linear(32, TAGS)
        self.crf = _import("torchcrf").CRF(TAGS, batch_first=True)

    def forward(self, words, lengths, tags, mask):
        x = self.embedding(words)
        if self.packed:
            h, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=words.shape[1])
        else:
            h, _ = self.lstm(x)
        return -self.crf(self.emissions(h), tags, mask=mask, reduction=self.reduction)


class BertCRF(nn.Module):
    """A tiny BertModel, linear emissions and torchcrf.CRF over the attention mask (reduction="mean")."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel
        self.bert = BertModel(BertConfig(vocab_size=VOCAB + 1, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=32))
        self.emissions = nn.Linear(32, TAGS)
        self.crf = _import("torchcrf").CRF(TAGS, batch_first=True)

    def forward(self, words, lengths, tags, mask):
        h = self.bert(input_ids=words, attention_mask=mask.long()).last_hidden_state
        return -self.crf(self.emissions(h), tags, mask=mask, reduction="mean")


def _flair_corpus(g: torch.Generator):
    """BATCH flair Sentences of 3-9 words `w<i>x` from VOCAB, each word with a random "pos" tag, as a Corpus."""
    flair = _import("flair")
    sentences = []
    for _ in range(BATCH):
        words = torch.randint(0, VOCAB, (int(torch.randint(3, WORDS + 1, (1,), generator=g)),), generator=g)
        sentence = flair.data.Sentence([f"w{int(i)}x" for i in words])
        for token in sentence:
            token.add_label("pos", ["NN", "VB", "DT", "JJ"][int(torch.randint(0, TAGS, (1,), generator=g))])
        sentence.add_label("topic", ["a", "b", "c"][int(torch.randint(0, 3, (1,), generator=g))])
        sentences.append(sentence)
    data = flair.datasets.FlairDatapointDataset
    return flair.data.Corpus(data(sentences), data(sentences[:2]), data(sentences[:2]))


def _flair_model(name: str) -> nn.Module:
    flair = _import("flair")
    corpus = _flair_corpus(torch.Generator().manual_seed(1))
    chars = flair.data.Dictionary()
    for ch in "wx0123456789":
        chars.add_item(ch)
    embeddings = flair.embeddings
    words = embeddings.OneHotEmbeddings.from_corpus(corpus, embedding_length=16, min_freq=1)
    if name == "flair_tagger":
        stacked = embeddings.StackedEmbeddings([words, embeddings.CharacterEmbeddings(chars, 8, 8)])
        return flair.models.SequenceTagger(hidden_size=16, embeddings=stacked, use_crf=True, tag_type="pos",
                                           tag_dictionary=corpus.make_label_dictionary("pos"))
    document = embeddings.DocumentRNNEmbeddings([words], hidden_size=16, rnn_type="GRU")
    return flair.models.TextClassifier(document, label_type="topic",
                                       label_dictionary=corpus.make_label_dictionary("topic"))


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "crf_packed":
        return CRFTagger(packed=True, reduction="sum")
    if name == "crf_padded":
        return CRFTagger(packed=False, reduction="mean")
    if name == "bert_crf":
        return BertCRF()
    if name in FLAIR:
        return _flair_model(name)
    from benchmarks.clip_probe import _tiny_bert
    st = _import("sentence_transformers")
    modules = st.sentence_transformer.modules
    return st.SentenceTransformer(modules=[modules.Transformer(_tiny_bert(), max_seq_length=16),
                                           modules.Pooling(32, "mean")])


def problem(name: str, model: nn.Module, dtype=torch.float32):
    """(batch, loss(compiled or plain model, batch)) of `name` as its users train it (module doc); `model` is
    the module itself (sentence-transformers' tokenizers and losses are built from it)."""
    g = torch.Generator().manual_seed(1)
    if name in CRF:
        lengths = torch.randint(3, WORDS + 1, (BATCH,), generator=g)
        mask = torch.arange(WORDS) < lengths[:, None]
        mask[:, 0] = True  # torchcrf: the first token of every sentence is on
        words = torch.randint(1, VOCAB + 1, (BATCH, WORDS), generator=g) * mask
        tags = torch.randint(0, TAGS, (BATCH, WORDS), generator=g) * mask
        return (words, lengths, tags, mask), lambda m, b: m(*b)
    if name in FLAIR:
        flair = _import("flair")
        sentences = list(_flair_corpus(g).train)

        def flair_loss(m, b):  # flair's ModelTrainer: the summed loss of the batch, embeddings cleared after
            loss, _ = m.forward_loss(b)
            flair.training_utils.store_embeddings(b, "none")
            return loss
        return sentences, flair_loss
    from benchmarks.clip_probe import _sentences
    losses = _import("sentence_transformers").sentence_transformer.losses
    columns = 3 if name == "st_triplet" else 2
    features = [dict(model.preprocess(_sentences(g, BATCH))) for _ in range(columns)]
    if name == "st_cosent":
        scores = torch.rand(BATCH, generator=g, dtype=dtype)
        return (features, scores), lambda m, b: losses.CoSENTLoss(m)(*b)
    if name == "st_triplet":
        return (features, torch.zeros(BATCH)), lambda m, b: losses.TripletLoss(m)(*b)
    return (features, torch.arange(BATCH)), lambda m, b: losses.CachedMultipleNegativesRankingLoss(
        m, mini_batch_size=BATCH // 2, show_progress_bar=False)(*b)


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    return kind, {**hparams, "methods": ["forward_loss"]} if name in FLAIR else hparams


def factor_gaps(name: str, hparams: dict) -> str:
    """The first step's A and S of the nn.Linear and nn.Embedding blocks against hooks (module doc), in the
    current dtype: 'L linear, E embedding: A gap; S = m Σggᵀ (gap)', m fitted over all of them."""
    dtype = torch.get_default_dtype()  # (a saved BERT loads in the dtype it was saved in)
    torch.manual_seed(0)
    model = build(name).to(dtype)
    torch.manual_seed(0)
    reference = build(name).to(dtype)  # a second build: flair's DocumentRNNEmbeddings cannot be deep-copied
    batch, loss_of = problem(name, model, torch.get_default_dtype())
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    torch.manual_seed(7)
    loss_of(c, batch).backward()  # (c.layers after the first call; their names, which may be another path to a
    # module flair registers twice, found in the second build)
    modules = dict(reference.named_modules(remove_duplicate=False))
    blocks = {b.name: modules[b.name] for b in c.layers if type(modules.get(b.name)) in (nn.Linear, nn.Embedding)}
    with hooked_calls(reference, list(blocks), direct=True) as calls:  # (flair: `embedding_layer.forward(ids)`)
        torch.manual_seed(7)
        loss_of(reference, batch).backward()
    c.step()
    pairs, a_gap = [], 0.0
    # (an embedding read by every example, BERT's position ids (1, T), is left out: gnfx takes its rows per
    # example, the gradient at the rows of the sum it is broadcast into; a hook sees their sum over the batch)
    reached = [n for n in blocks if any(g is not None for _, g in calls[n])
               and not (type(blocks[n]) is nn.Embedding and any(a.dim() > 1 and len(a) == 1 for a, _ in calls[n]))]
    for block in reached:  # (a pooler whose output the loss does not read is no row)
        module = blocks[block]
        A, gg = (linear_factors(calls[block], c.layers[block].bias is not None) if type(module) is nn.Linear
                 else embedding_factors(calls[block], module.num_embeddings))
        stats = c.statistics(block)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
        pairs.append((stats["S"], gg))
    if not pairs:
        return "no linear block"
    m = sum((s * gg).sum() for s, gg in pairs) / sum((gg * gg).sum() for _, gg in pairs)
    s_gap = max(((s - m * gg).abs().max() / s.abs().max()).item() for s, gg in pairs)
    embeddings = sum(type(blocks[n]) is nn.Embedding for n in reached)
    kinds = f"{len(pairs) - embeddings} linear" + (f", {embeddings} embedding" if embeddings else "")
    return f"{kinds}: A {a_gap:.0e}; S = {m.item():.4g} Σggᵀ ({s_gap:.0e})"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S against hooks': the compiled float64 model beside a second build from the same
    seed, over 3 steps; the first step's factors against hooks (`factor_gaps`)."""
    def loss_for(model):
        batch, loss_of = problem(name, model, torch.float64)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def trainer_row(name: str, hparams: dict, steps: int) -> str:
    """The row of flair's own ModelTrainer (module doc): `steps` epochs of one batch, kfac at `hparams`."""
    import time
    import warnings
    flair = _import("flair")
    start, losses, error, c = time.time(), [], "", None
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as base:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = build(name).train()
        try:
            c = gnfx.compile(model, "kfac", **hparams)

            def forward_loss(sentences):
                loss, count = c.forward_loss(sentences)
                losses.append(f"{loss.item():.3g}")
                return loss, count
            model.forward_loss = forward_loss
            corpus = _flair_corpus(torch.Generator().manual_seed(1))
            flair.trainers.ModelTrainer(model, corpus).train(
                base, optimizer=c.optimizer_for, learning_rate=hparams["lr"], mini_batch_size=BATCH,
                max_epochs=steps, shuffle=False, train_with_dev=False, save_final_model=False,
                create_file_logs=False, create_loss_file=False, use_final_model_for_eval=True)
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            error = f"{type(exc).__name__}: {exc}"
    form, blocks, outside = capture_cells(c, model)
    said = gnfx_warnings(caught, 160)
    return (f"| {name} | trainer (ModelTrainer, optimizer=optimizer_for, lr={hparams['lr']}) | {form} | {blocks} | "
            f"– | {', '.join(losses) or '–'} | {cell(outside, 300)} | {'; '.join(said) or '–'} | "
            f"{cell(error, 500) or '–'} | {time.time() - start:.0f} |")


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)
    if optimizer == "trainer":
        return trainer_row(name, hparams, steps)
    if kind == "adamw":
        hparams = {k: v for k, v in hparams.items() if k != "methods"}

    def made():
        model = build(name).train()
        batch, loss_of = problem(name, model)
        return model, lambda c: loss_of(c, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(200, 300, 500))


def main() -> None:
    probe_main(__doc__, "benchmarks.nlp_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300,  # the trainer rows for flair's models only
               chosen=lambda name, optimizer, given: optimizer != "trainer" or name in FLAIR)


if __name__ == "__main__":
    main()
