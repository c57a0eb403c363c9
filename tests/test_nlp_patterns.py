"""NLP libraries' patterns (flair, pytorch-crf, sentence-transformers; benchmarks/nlp_probe.py), in plain torch.

A BiLSTM tagger packs its padded batch (`pack_padded_sequence(..., enforce_sorted=False)`, the LSTM on the
PackedSequence, `pad_packed_sequence`), as flair's SequenceTagger and most BiLSTM-CRF code do: the LSTM is
lowered on the packed rows (gnfx.recurrent.packed_scan), its input and hidden products are blocks whose
rows are the (example, step) pairs the sequences have, and its statistics equal those of a cell written
out here on each example's own unpadded sequence (benchmarks/results/first_contact_12_nlp.md).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gnfx
from references import TOL, cross_entropy, kfac_factors
from steps import compile_for_statistics

DTYPE = torch.float64


class PackedBiLSTM(nn.Module):
    """Embedding, a bidirectional LSTM on the packed batch and a head on each example's summed outputs."""

    def __init__(self, hidden=4, **options):
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.rnn = nn.LSTM(3, hidden, batch_first=True, bidirectional=True, **options)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        padded, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(padded.sum(1))


def batch():
    tokens, lengths = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1)), torch.tensor([3, 6, 2, 5])
    return (tokens, lengths), torch.tensor([0, 1, 1, 0])


def unrolled_rows(model: PackedBiLSTM, tokens, lengths, y):
    """{parameter name: [(a, g)]}, the rows (R, d), (R, G) of every input and hidden product of both
    directions, one row per (example, step) of each example's own sequence (no padding), by an LSTM cell
    written out here whose products retain their gradients; M, the loss terms."""
    rnn, hidden = model.rnn, model.rnn.hidden_size
    records = {suffix: [] for suffix in ("_l0", "_l0_reverse")}
    outputs = []
    for n, length in enumerate(lengths.tolist()):
        x = model.embed(tokens[n, :length])
        summed = []
        for suffix, steps in (("_l0", range(length)), ("_l0_reverse", range(length - 1, -1, -1))):
            W_ih, W_hh = getattr(rnn, "weight_ih" + suffix), getattr(rnn, "weight_hh" + suffix)
            b_ih, b_hh = getattr(rnn, "bias_ih" + suffix), getattr(rnn, "bias_hh" + suffix)
            h, c, total = (torch.zeros(hidden, dtype=DTYPE) for _ in range(3))
            for t in steps:
                gx, hp = W_ih @ x[t] + b_ih, W_hh @ h + b_hh
                gx.retain_grad()
                hp.retain_grad()
                records[suffix].append((x[t], gx, h, hp))
                i, f, g, o = (gx + hp).split(hidden)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                total = total + h
            summed.append(total)
        outputs.append(model.head(torch.cat(summed)))
    out = torch.stack(outputs)
    torch.testing.assert_close(out, model(tokens, lengths), **TOL)  # the written-out cell is the module's
    cross_entropy(out, y).backward()
    model.zero_grad()
    rows = {}
    for suffix, recorded in records.items():
        stack = lambda k, grad=False: torch.stack([r[k].grad if grad else r[k].detach() for r in recorded])  # noqa: E731
        rows[f"rnn.weight_ih{suffix}"] = [(stack(0), stack(1, True))]
        rows[f"rnn.weight_hh{suffix}"] = [(stack(2), stack(3, True))]
    return rows, len(y)


def test_an_lstm_on_a_packed_sequence_is_blocks_whose_factors_are_the_unpadded_sequences():
    """Both directions' input and hidden products are blocks (before: the LSTM fell back to the diagonal
    preconditioner, 'its input is a PackedSequence'), A and S over the rows of each example's own steps."""
    torch.manual_seed(0)
    model = PackedBiLSTM().to(DTYPE)
    (tokens, lengths), y = batch()
    rows, M = unrolled_rows(model, tokens, lengths, y)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    assert {b.name: b.kind for b in c.layers} == {
        "embed": "embedding", "rnn.weight_ih_l0": "linear", "rnn.weight_hh_l0": "recurrent",
        "rnn.weight_ih_l0_reverse": "linear", "rnn.weight_hh_l0_reverse": "recurrent", "head": "linear"}
    assert not c.layers.fallbacks
    cross_entropy(c(tokens, lengths), y).backward()
    c.step()
    for name, calls in rows.items():
        got, expected = c.statistics(name), kfac_factors(calls, True, "expand", M)
        torch.testing.assert_close(got["A"], expected["A"], **TOL)
        torch.testing.assert_close(got["S"], expected["S"], **TOL)


@pytest.mark.parametrize("sorted_batch", [False, True])
def test_the_lowered_packed_lstm_computes_the_modules_outputs_states_and_gradients(sorted_batch):
    """The captured model beside the model over a statistic step (the lowered scan) and a plain one:
    outputs, h_n and c_n in the examples' given order (hx given), and every gradient (float64)."""

    class WithStates(PackedBiLSTM):
        def forward(self, tokens, lengths, h0, c0):
            packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                          enforce_sorted=sorted_batch)
            out, (h_n, c_n) = self.rnn(packed, (h0, c0))
            padded, _ = pad_packed_sequence(out, batch_first=True)
            return self.head(padded.sum(1)) + self.head(torch.cat([h_n[0], c_n[1]], -1))

    torch.manual_seed(0)
    model = WithStates(num_layers=2).to(DTYPE)
    (tokens, lengths), y = batch()
    if sorted_batch:
        lengths = lengths.sort(descending=True).values
    h0, c0 = torch.randn(4, 4, 4, dtype=DTYPE), torch.randn(4, 4, 4, dtype=DTYPE)
    reference = model(tokens, lengths, h0, c0)
    grads = torch.autograd.grad(F.cross_entropy(reference, y), list(model.parameters()))
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture="fx")
    assert not c.layers.fallbacks
    for _ in range(2):  # a statistic step (the lowered graph) and a plain one (the module's kernel)
        out = c(tokens, lengths, h0, c0)
        torch.testing.assert_close(out, reference, **TOL)
        got = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
        for name, a, b in zip([n for n, _ in model.named_parameters()], got, grads):
            torch.testing.assert_close(a, b, **TOL, msg=name)


class SentenceTagger(PackedBiLSTM):
    """flair's pattern: the training loop calls a method on Python sentences (token lists) that pads, packs
    and runs the forward; compiled with methods=["tag"], the method's code runs as written and the layers
    it calls are opened, the LSTM with its hx omitted and a PackedSequence at run time. (flair's
    forward_loss returns the loss itself: then no output gives N, see first_contact_12_nlp.md.)"""

    def tag(self, sentences: list[list[int]]):
        lengths = torch.tensor([len(s) for s in sentences])
        tokens = nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sentences], batch_first=True)
        return self(tokens, lengths)


def test_an_lstm_called_on_a_packed_sequence_by_a_method_is_opened_with_the_unpadded_factors():
    """Before, the opened method's LSTM stayed closed ('its forward takes optional or variadic inputs'),
    its parameters on the diagonal preconditioner (flair's SequenceTagger: 19% of the parameters in blocks)."""
    torch.manual_seed(0)
    model = SentenceTagger().to(DTYPE)
    (tokens, lengths), y = batch()
    sentences = [tokens[n, :length].tolist() for n, length in enumerate(lengths.tolist())]
    rows, M = unrolled_rows(model, tokens, lengths, y)
    c = compile_for_statistics(model, optimizer="kfac", methods=["tag"])
    cross_entropy(c.tag(sentences), y).backward()
    c.step()
    assert not [f.param for f in c.layers.fallbacks if f.param.startswith("rnn.")]
    for name, calls in rows.items():
        got, expected = c.statistics(name), kfac_factors(calls, True, "expand", M)
        torch.testing.assert_close(got["A"], expected["A"], **TOL)
        torch.testing.assert_close(got["S"], expected["S"], **TOL)


def test_a_compiled_container_is_indexed_as_the_module_it_was_compiled_from():
    """sentence-transformers' GradCache losses (CachedMultipleNegativesRankingLoss) read `model[0]` of the
    SentenceTransformer (an nn.Sequential) they are given: a TypeError ('not subscriptable') before."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    assert c[0] is model[0] and c[-1] is model[2]
    assert isinstance(c[:2], nn.Sequential) and c[:2][1] is model[1]
    with pytest.raises(TypeError, match="not subscriptable: nor is the Linear"):
        gnfx.compile(nn.Linear(3, 2), optimizer="kfac", lr=0.1)[0]


class FlatColumnClassifier(nn.Module):
    """flair's OneHotEmbeddings in a TextClassifier: the batch's tokens looked up as one column of ids (T,),
    padded to (N, L, d) per sentence, a linear head, a mean over the positions; `forward_loss` returns the
    mean cross-entropy itself (a 0-dimensional output: no batch size)."""

    def __init__(self, vocabulary=9, width=3, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids, lengths):
        rows = self.embed(ids)
        return self.head(nn.utils.rnn.pad_sequence(rows.split(lengths), batch_first=True)).mean(1)

    def forward_loss(self, ids, lengths, y):
        return F.cross_entropy(self(ids, lengths), y)


def test_a_flat_column_of_ids_under_a_scalar_output_counts_the_examples_of_the_head():
    """S = B Σ g gᵀ for both blocks, B the sentences the head (the block nearest the loss) counts: before, the
    column (T,) counted T examples (S 14/4 times the Linear's; 1 example before 009e41f), for no output of the
    method gives N."""
    torch.manual_seed(0)
    model = FlatColumnClassifier().to(DTYPE)
    lengths = [3, 5, 2, 4]
    ids, y = torch.randint(0, 9, (sum(lengths),)), torch.tensor([0, 1, 1, 0])
    outputs = {}
    for module in (model.embed, model.head):
        module.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, (i[0], o)))
    loss = model.forward_loss(ids, lengths, y)
    g_embed, g_head = torch.autograd.grad(loss, [outputs[model.embed][1], outputs[model.head][1]])
    B = len(lengths)
    c = compile_for_statistics(model, optimizer="kfac", methods=["forward_loss"])
    c.forward_loss(ids, lengths, y).backward()
    c.step()
    embed, head = c.statistics("embed"), c.statistics("head")
    torch.testing.assert_close(embed["S"], B * g_embed.T @ g_embed, **TOL)
    torch.testing.assert_close(embed["A"], torch.bincount(ids, minlength=9).to(DTYPE) / ids.numel(), **TOL)
    expected = kfac_factors([(outputs[model.head][0], g_head)], True, "expand", B)
    torch.testing.assert_close(head["S"], expected["S"], **TOL)
    torch.testing.assert_close(head["A"], expected["A"], **TOL)



class TokenBiasClassifier(FlatColumnClassifier):
    """A linear layer on the flat rows (T, d) before the padding (its input counts T; `mid`, if any, and the
    head's N), and a per-token bias looked up by the column and summed per sentence after the head, so that the
    backward reaches that column first."""

    def __init__(self, mid: bool):
        super().__init__(width=3, classes=3)
        self.rows = nn.Linear(3, 3)
        self.mid = nn.Linear(3, 3) if mid else nn.Identity()
        self.token_bias = nn.Embedding(9, 3)

    def forward(self, ids, lengths):
        rows = self.rows(self.embed(ids))
        logits = self.head(self.mid(nn.utils.rnn.pad_sequence(rows.split(lengths), batch_first=True).mean(1)))
        return logits + nn.utils.rnn.pad_sequence(self.token_bias(ids).split(lengths), batch_first=True).sum(1)


@pytest.mark.parametrize("mid", [True, False])
def test_a_flat_column_reached_before_the_head_counts_what_most_blocks_count_or_its_own_on_a_tie(mid):
    """With `mid`, two blocks count N = 4 sentences and one T = 14 rows: the column first reached counts 4, as
    the one reached after the head; without, as many count 4 as 14: it keeps its T, warned. Before, both columns
    counted T, silently."""
    torch.manual_seed(0)
    model = TokenBiasClassifier(mid).to(DTYPE)
    lengths = [3, 5, 2, 4]
    ids, y = torch.randint(0, 9, (sum(lengths),)), torch.tensor([0, 1, 2, 0])
    outputs = {}
    for name in ("embed", "token_bias"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    g = dict(zip(outputs, torch.autograd.grad(model.forward_loss(ids, lengths, y), list(outputs.values()))))
    c = compile_for_statistics(model, optimizer="kfac", methods=["forward_loss"])
    if mid:
        c.forward_loss(ids, lengths, y).backward()
    else:
        with pytest.warns(RuntimeWarning, match=r"'token_bias'.*these count 4 and 14 examples as often: it counts "
                                                 r"its own 14"):
            c.forward_loss(ids, lengths, y).backward()
    c.step()
    for name, examples in (("embed", len(lengths)), ("token_bias", len(lengths) if mid else ids.numel())):
        torch.testing.assert_close(c.statistics(name)["S"], examples * g[name].T @ g[name], **TOL)


class PositionsClassifier(nn.Module):
    """BERT's embeddings: token ids (N, L) and position ids (1, L), read by every example; a linear head, a
    mean over the positions; the forward returns the mean cross-entropy (a 0-dimensional output)."""

    def __init__(self, vocabulary=9, length=5, width=3, classes=2):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocabulary, width), nn.Embedding(length, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids, y):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1])[None])
        return F.cross_entropy(self.head(x).mean(1), y)


def test_position_ids_of_one_row_under_a_scalar_output_count_the_examples_of_the_head():
    """The position table's S = N Σ g gᵀ as the token table's and the head's: before, its ids (1, L) counted one
    example (S N times too small)."""
    torch.manual_seed(0)
    model = PositionsClassifier().to(DTYPE)
    ids, y = torch.randint(0, 9, (4, 5)), torch.tensor([0, 1, 1, 0])
    outputs = {}
    for name in ("tokens", "positions"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    g = dict(zip(outputs, torch.autograd.grad(model(ids, y), list(outputs.values()))))
    c = compile_for_statistics(model, optimizer="kfac")
    c(ids, y).backward()
    c.step()
    for name in ("tokens", "positions"):
        rows = g[name].reshape(-1, 3)
        torch.testing.assert_close(c.statistics(name)["S"], len(ids) * rows.T @ rows, **TOL)


class CharacterClassifier(nn.Module):
    """flair's CharacterEmbeddings: a character table called once per sentence on its words' characters
    (words, characters), each word the mean of its characters' rows, the sentences padded to (N, L, d), a linear
    head and a mean over the positions; `forward_loss` returns the mean cross-entropy."""

    def __init__(self, alphabet=7, width=3, classes=2):
        super().__init__()
        self.chars = nn.Embedding(alphabet, width)
        self.head = nn.Linear(width, classes)

    def forward_loss(self, sentences, y):
        words = nn.utils.rnn.pad_sequence([self.chars(s).mean(1) for s in sentences], batch_first=True)
        return F.cross_entropy(self.head(words).mean(1), y)


def test_a_table_called_on_each_sentence_under_a_scalar_output_counts_the_examples_of_the_head():
    """Its calls' first dimensions (each sentence's words: 4, 5, 2) tell no N: it takes the head's, S = N Σ g gᵀ
    over every call's rows; before, the first call's 4 words."""
    torch.manual_seed(0)
    model = CharacterClassifier().to(DTYPE)
    sentences = [torch.randint(0, 7, (words, 4)) for words in (4, 5, 2)]
    y = torch.tensor([0, 1, 1])
    outputs = []
    model.chars.register_forward_hook(lambda m, i, o: outputs.append(o))
    g = torch.autograd.grad(model.forward_loss(sentences, y), outputs)
    rows = torch.cat([gi.reshape(-1, 3) for gi in g])
    c = compile_for_statistics(model, optimizer="kfac", methods=["forward_loss"])
    c.forward_loss(sentences, y).backward()
    c.step()
    torch.testing.assert_close(c.statistics("chars")["S"], len(sentences) * rows.T @ rows, **TOL)
