"""First contact with speech and audio libraries: speechbrain, asteroid and transformers' audio models, called as
their users call them.

    PYTHONPATH=<speechbrain, asteroid, asteroid_filterbanks>:<hyperpyyaml, ruamel.yaml, sentencepiece, soundfile,
        cffi, pycparser, pb_bss_eval, torchaudio (its Python code)>:<a stub `requests`>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.audio_probe [--models ecapa crdnn_ctc] [--optimizers kfac kfac_lr] [--steps 3] \
        [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for:

- speechbrain 1.1 (features as its recipes compute them, outside the trained model: `Fbank` and
  `InputNormalization`, which hold no parameters):
  `ecapa`: speaker recognition, `ECAPA_TDNN(24 fbanks, channels [32, 32, 32, 32, 96], 16-dim embedding)` and its
  cosine `Classifier(16, 10 speakers)` (`F.linear(normalize(x), normalize(W))`) in one module called on
  (feats, lens), loss `LogSoftmaxWrapper(AdditiveAngularMargin(margin 0.2, scale 30))` (AAM-softmax);
  `ecapa_brain`: the same trained by speechbrain's own loop, a `Brain` subclass (compute_forward: the features,
  the sentence normalization and the compiled model; compute_objectives: the AAM loss) given
  `opt_class=model.optimizer_for` (AdamW through a lambda for the reference), `brain.fit` over a DataLoader of
  `--steps` copies of the batch (Brain clips the gradients' norm to 5 before each step);
  `crdnn_ctc`: `CRDNN` (one CNN block of 8 channels with speechbrain's 2-D LayerNorm, time pooling, a
  bidirectional LSTM of 16, one DNN block) under speechbrain's `Linear` to 12 tokens and log-softmax, loss
  speechbrain's `ctc_loss` with relative lengths; `crdnn_ctc_norm`: the same with the
  `InputNormalization(norm_type="global")` inside the compiled module (its running count a Python number
  updated from the data: torch.export refuses it, so torch.fx's graph with opaque leaves is kept, and
  speechbrain's Sequential tests `isinstance(x, tuple)` after its RNN wrapper, a leaf: the two fixes of
  this round); `conformer_ctc`: `TransformerASR(encoder_module="conformer", attention RelPosMHAXL, 2 layers of
  width 32, no decoder)` through its `EncoderWrapper`, `Linear` and log-softmax, CTC;
- asteroid 0.7 (source separation, two sources from 800-sample mixtures): `convtasnet` (`ConvTasNet`: learned
  filterbank encoder, a TCN of depthwise Conv1d blocks with PReLU and global layer norm, a ConvTranspose1d
  decoder), `dprnn` (`DPRNNTasNet`: chunked intra- and inter-chunk bidirectional LSTMs), both trained with
  `PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")` (the SI-SDR of the best permutation of the sources);
- transformers (in the venv): `wav2vec2_mask` and `hubert_mask`: `Wav2Vec2ForCTC` / `HubertForCTC` from 1600
  samples (group-norm feature extractor, the positional Conv1d under weight norm over dim=2, SpecAugment time
  masking at `mask_time_prob=0.5`, the masked frames replaced by `masked_spec_embed`; transformers draws the
  spans with numpy's global generator, seeded here from torch's before each forward so that runs and the
  lockstep copies draw alike; LayerDrop at the configs' default 0.1), trained with their own labels → CTC loss
  (summed, as transformers' default `ctc_loss_reduction`); `encodec`: `EncodecModel`
  (weight-normed Conv1d / ConvTranspose1d stacks, an LSTM, a residual vector quantizer), L1 reconstruction of
  its input; `dac`: `DacModel` (weight-normed convolutions, Snake activations with learned α), L1 reconstruction
  plus its commitment and codebook losses (`out.loss`).

Optimizers: "kfac" at its defaults (no `loss=`: CTC, the AAM-softmax, SI-SDR with PIT and the reconstruction
losses are none gnfx models; at its default lr), "kfac_lr" (lr 1e-3), "shampoo" and "diag" at lr 1e-3, and
torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the share of the trainable parameters in
curvature blocks, exactness (kfac_lr, float64: the compiled model beside a second copy over 3 steps, the largest
|difference| of the loss and of any gradient, benchmarks.lockstep; and the first statistic step's A and S of every
block of a linear layer, nn.Linear or a pointwise nn.Conv1d (kernel 1, one group: a linear map of each time
step's channels), against plain hooks on every call, benchmarks.hooked_calls: A = mean of [a 1][a 1]ᵀ over the
calls' rows (time steps), S = M Σ g gᵀ, M read off gnfx's S), the losses, gnfx's warnings and the parameters
outside the blocks, the seconds; or the error. ecapa_brain's exactness is ecapa's (the same model). None of these
libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_12_audio.md.
"""
from __future__ import annotations

import copy
import time
import warnings

import numpy
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import lockstep_gaps

BATCH, SAMPLES, FBANKS, TOKENS = 4, 4000, 20, 12
MODELS = ("ecapa", "ecapa_brain", "crdnn_ctc", "crdnn_ctc_norm", "conformer_ctc", "convtasnet", "dprnn",
          "wav2vec2_mask", "hubert_mask", "encodec", "dac")
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.audio_probe", name)


class Speaker(nn.Module):
    """speechbrain's speaker-recognition recipe's embedding model and classifier, called on (feats, lens)."""

    def __init__(self):
        super().__init__()
        ecapa = _import("speechbrain.lobes.models.ECAPA_TDNN")
        self.embedding_model = ecapa.ECAPA_TDNN(24, channels=[32, 32, 32, 32, 96], lin_neurons=16,
                                                attention_channels=16, res2net_scale=4, se_channels=16)
        self.classifier = ecapa.Classifier(16, out_neurons=10)

    def forward(self, feats, lens):
        return self.classifier(self.embedding_model(feats, lens))


class CTCHead(nn.Module):
    """An encoder, speechbrain's Linear to the tokens and the log-softmax (its CTC recipes' compute_forward);
    `norm`: the feature normalization inside, before the encoder."""

    def __init__(self, encoder: nn.Module, width: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm, self.enc = norm, encoder
        self.ctc_lin = _import("speechbrain.nnet.linear").Linear(input_size=width, n_neurons=TOKENS)

    def forward(self, feats, lens):
        if self.norm is not None:
            feats = self.norm(feats, lens)
        return self.ctc_lin(self.enc(feats)).log_softmax(-1)


def _crdnn(norm: bool) -> nn.Module:
    sb = _import("speechbrain")
    crdnn = _import("speechbrain.lobes.models.CRDNN").CRDNN(
        input_size=FBANKS, cnn_blocks=1, cnn_channels=[8], inter_layer_pooling_size=[2], time_pooling=True,
        rnn_class=sb.nnet.RNN.LSTM, rnn_layers=1, rnn_neurons=16, dnn_blocks=1, dnn_neurons=16, dropout=0.1)
    normalization = _import("speechbrain.processing.features").InputNormalization(norm_type="global") if norm else None
    return CTCHead(crdnn, 16, normalization)


def _conformer() -> nn.Module:
    transformer = _import("speechbrain.lobes.models.transformer.TransformerASR")
    asr = transformer.TransformerASR(tgt_vocab=TOKENS, input_size=FBANKS, d_model=32, nhead=4, num_encoder_layers=2,
                                     num_decoder_layers=0, d_ffn=64, dropout=0.1, encoder_module="conformer",
                                     attention_type="RelPosMHAXL", normalize_before=True, kernel_size=7)
    return CTCHead(transformer.EncoderWrapper(asr), 32)


def _transformers(name: str) -> nn.Module:
    import transformers
    if name in ("wav2vec2_mask", "hubert_mask"):
        kwargs = dict(vocab_size=TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.5,
                      mask_time_length=2, feat_extract_norm="group", do_stable_layer_norm=False)
        if name == "wav2vec2_mask":
            return transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**kwargs))
        return transformers.HubertForCTC(transformers.HubertConfig(**kwargs))
    if name == "encodec":
        return transformers.EncodecModel(transformers.EncodecConfig(
            target_bandwidths=[10.0], sampling_rate=8000, audio_channels=1, hidden_size=16, num_filters=4,
            num_residual_layers=1, upsampling_ratios=[4, 2], codebook_size=32, codebook_dim=16, num_lstm_layers=1,
            norm_type="weight_norm"))
    return transformers.DacModel(transformers.DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=16, n_codebooks=2, codebook_size=32,
        codebook_dim=4, hidden_size=16, upsampling_ratios=[4, 2]))


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name in ("ecapa", "ecapa_brain"):
        return Speaker()
    if name in ("crdnn_ctc", "crdnn_ctc_norm"):
        return _crdnn(norm=name == "crdnn_ctc_norm")
    if name == "conformer_ctc":
        return _conformer()
    if name in ("convtasnet", "dprnn"):
        models = _import("asteroid.models")
        common = dict(n_src=2, n_filters=16, kernel_size=16, stride=8, bn_chan=16, n_repeats=1, sample_rate=8000)
        if name == "convtasnet":
            return models.ConvTasNet(hid_chan=32, skip_chan=16, n_blocks=2, **common)
        return models.DPRNNTasNet(hid_size=16, chunk_size=10, **common)
    return _transformers(name)


def _features(g: torch.Generator, dtype, norm: bool):
    """(feats, relative lengths) of a batch of random waveforms: speechbrain's Fbank, and (`norm`) a sentence
    mean normalization, as its recipes compute them before the model."""
    features = _import("speechbrain.lobes.features")
    processing = _import("speechbrain.processing.features")
    wavs = torch.randn(BATCH, SAMPLES, generator=g)
    lens = torch.tensor([1.0, 0.9, 0.8, 1.0])
    with torch.no_grad():
        feats = features.Fbank(n_mels=24 if norm else FBANKS)(wavs)
        if norm:
            feats = processing.InputNormalization(norm_type="sentence", std_norm=False)(feats, lens)
    return feats.to(dtype), lens.to(dtype)


def problem(name: str, dtype=torch.float32):
    """loss(compiled model or the model itself) on one fixed batch (module doc)."""
    g = torch.Generator().manual_seed(1)
    if name in ("ecapa", "ecapa_brain"):
        losses = _import("speechbrain.nnet.losses")
        feats, lens = _features(g, dtype, norm=True)
        speakers = torch.randint(0, 10, (BATCH, 1), generator=g)
        aam = losses.LogSoftmaxWrapper(losses.AdditiveAngularMargin(margin=0.2, scale=30))
        return lambda m: aam(m(feats, lens), speakers, lens)
    if name in ("crdnn_ctc", "crdnn_ctc_norm", "conformer_ctc"):
        ctc_loss = _import("speechbrain.nnet.losses").ctc_loss
        feats, lens = _features(g, dtype, norm=False)
        tokens = torch.randint(1, TOKENS, (BATCH, 6), generator=g)
        token_lens = torch.tensor([1.0, 0.5, 0.8, 1.0], dtype=dtype)
        return lambda m: ctc_loss(m(feats, lens), tokens, lens, token_lens, blank_index=0)
    if name in ("convtasnet", "dprnn"):
        asteroid_losses = _import("asteroid.losses")
        pit = asteroid_losses.PITLossWrapper(asteroid_losses.pairwise_neg_sisdr, pit_from="pw_mtx")
        sources = torch.randn(BATCH, 2, 800, generator=g, dtype=dtype)
        mixture = sources.sum(1)
        return lambda m: pit(m(mixture), sources)
    if name in ("wav2vec2_mask", "hubert_mask"):
        audio = torch.randn(BATCH, 1600, generator=g, dtype=dtype)
        labels = torch.randint(1, TOKENS, (BATCH, 8), generator=g)

        def ctc(m):  # transformers draws the SpecAugment spans with numpy's global generator: seeded from torch's,
            numpy.random.seed(int(torch.randint(0, 2 ** 31 - 1, ())))  # which the runs and lockstep_gaps seed
            return m(input_values=audio, labels=labels).loss
        return ctc
    audio = torch.randn(BATCH, 1, 800, generator=g, dtype=dtype)
    if name == "encodec":
        return lambda m: F.l1_loss(m(audio).audio_values, audio)

    def dac_loss(m):
        out = m(audio)
        return F.l1_loss(out.audio_values, audio.squeeze(1)) + out.loss.mean()
    return dac_loss


def _linear_rows(module: nn.Module):
    """How a linear layer's hooked a and g become rows (features last), or None for another layer: an
    nn.Linear's as they are, a pointwise nn.Conv1d's (N, C, L) as its N·L time steps."""
    if isinstance(module, nn.Linear):
        return lambda t: t
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1 and module.padding in (
            (0,), "valid"):
        return lambda t: t.transpose(1, -1)
    return None


def factor_gaps(name: str, dtype: torch.dtype) -> str:
    """'A Δ, S Δ (M m, n linear)': the first statistic step's K-FAC factors of every linear block (nn.Linear, a
    pointwise Conv1d) against hooks."""
    torch.manual_seed(0)
    model = build(name).to(dtype).train()
    reference = copy.deepcopy(model)
    loss_of = problem(name, dtype)
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0)
    modules = dict(reference.named_modules())
    torch.manual_seed(7)
    loss_of(c).backward()
    rows_of = {b.name: _linear_rows(modules[b.name]) for b in c.layers.blocks if b.name in modules}
    linear = [n for n, rows in rows_of.items() if rows is not None]
    torch.manual_seed(7)
    with hooked_calls(reference, linear) as records:
        loss_of(reference).backward()
    c.step()
    a_gap = s_gap = 0.0
    ms = set()
    reached = {n: [(rows_of[n](a), rows_of[n](g)) for a, g in calls if g is not None] for n, calls in records.items()}
    for n, calls in reached.items():
        if not calls:  # a layer the backward did not reach (a dropped layer)
            continue
        A, s_sum = linear_factors(calls, modules[n].bias is not None)
        stats = c.statistics(n)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / stats["A"].abs().max()).item())
        m = (stats["S"].trace() / s_sum.trace()).item()  # gnfx's S = M Σ g gᵀ: its M
        ms.add(f"{m:.4g}")
        s_gap = max(s_gap, ((stats["S"] - m * s_sum).abs().max() / stats["S"].abs().max()).item())
    if not ms:
        return "no linear block"
    return f"A {a_gap:.0e}, S {s_gap:.0e} (M {'/'.join(sorted(ms))}, {sum(map(bool, reached.values()))} linear)"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ (M, linear blocks)' in float64 (module doc); in float32 for conformer_ctc,
    whose relative positional encoding speechbrain computes in float32 whatever the default dtype (the module
    itself fails in float64)."""
    dtype = torch.float32 if name == "conformer_ctc" else torch.float64
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = build(name).to(dtype).train()
        reference = copy.deepcopy(model)
        loss_of = problem(name, dtype)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m), 3, seed=100)
        return f"{loss_gap:.0e}, {grad_gap:.0e}; {factor_gaps(name, dtype)}"
    finally:
        torch.set_default_dtype(torch.float32)


def brain_row(optimizer: str, kind: str, hparams: dict, steps: int) -> str:
    """ecapa_brain's row: speechbrain's Brain.fit trains the compiled model, its optimizer from
    `opt_class=model.optimizer_for` (module doc)."""
    sb = _import("speechbrain")
    features = _import("speechbrain.lobes.features")
    processing = _import("speechbrain.processing.features")
    losses_module = _import("speechbrain.nnet.losses")
    torch.set_num_threads(1)
    start, losses, error, c = time.time(), [], "", None
    torch.manual_seed(0)
    model = build("ecapa_brain").train()

    class SpeakerBrain(sb.Brain):
        def compute_forward(self, batch, stage):
            wavs, lens, _ = batch
            feats = self.modules.mean_var_norm(self.modules.compute_features(wavs), lens)
            return self.modules.model(feats, lens), lens

        def compute_objectives(self, predictions, batch, stage):
            return self.hparams.compute_cost(predictions[0], batch[2], predictions[1])

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            losses.append(f"{loss.item():.4g}")

    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(BATCH, SAMPLES, generator=g), torch.tensor([1.0, 0.9, 0.8, 1.0]),
             torch.randint(0, 10, (BATCH, 1), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if kind == "adamw":
                c, opt_class = model, lambda params: torch.optim.AdamW(params, **hparams)
            else:
                c = gnfx.compile(model, kind, **hparams)
                opt_class = c.optimizer_for
            brain = SpeakerBrain(
                modules={"compute_features": features.Fbank(n_mels=24), "model": c,
                         "mean_var_norm": processing.InputNormalization(norm_type="sentence", std_norm=False)},
                opt_class=opt_class, run_opts={"device": "cpu", "noprogressbar": True},
                hparams={"compute_cost": losses_module.LogSoftmaxWrapper(
                    losses_module.AdditiveAngularMargin(margin=0.2, scale=30))})
            brain.fit(range(1), torch.utils.data.DataLoader([batch] * steps, batch_size=None))
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            error = f"{type(exc).__name__}: {exc}"
    form, blocks, outside = capture_cells(c, model)
    said = gnfx_warnings(caught, 160)
    setting = ", ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults"
    return (f"| ecapa_brain | {optimizer} ({setting}) | {form} | {blocks} | (as ecapa) | {', '.join(losses) or '–'} | "
            f"{cell(outside, 300)} | {'; '.join(said) or '–'} | {cell(error, 500) or '–'} | {time.time() - start:.0f} |")


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]
    if name == "ecapa_brain":
        return brain_row(optimizer, kind, hparams, steps)

    def made():
        model = build(name).train()
        return model, problem(name)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.audio_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=3, timeout=300)


if __name__ == "__main__":
    main()
