"""First contact with ultralytics' YOLO, torchtune's decoders and torchaudio's models, trained as their users do.

    PYTHONPATH=<libraries>:<their deps>:. OMP_NUM_THREADS=1 python -m benchmarks.ultra_probe \
        [--models yolov8n llama3_2 wav2vec2] [--runs exact kfac shampoo] [--steps 3] [--timeout 300] [--out table.md]

Each model is built from a tiny config with random weights (no download) and trained on one random batch:

- ultralytics (YOLO from its yaml, `nc=4`, `model.args = ultralytics.cfg.get_cfg()` as its trainer sets
  it): detection and segmentation as the trainer calls them, `loss, items = model(batch)` with the batch
  dict its dataloader builds ("img" (2, 3, 64, 64), "batch_idx", "cls", "bboxes" xywh in [0, 1], "masks"),
  `loss.sum().backward()`; or the criterion (v8DetectionLoss) on the compiled model's predictions,
  `module.loss(batch, model(batch["img"]))` (the `_preds` rows); classification `F.cross_entropy(model(img), cls)`
  (its v8ClassificationLoss);
- torchtune (its component builders at vocabulary 64, 2 layers, 4 heads, 2 key-value heads, width 32):
  `F.cross_entropy` of the logits (4, 16, 64) against the next tokens, the last ignored (-100); LoRA
  variants with only the adapters trainable (`set_trainable_params(model, get_adapter_params(model))` as
  its LoRA recipes); `llama3_2_chunked`: the recipes' `model.set_num_output_chunks(4)` and
  `CEWithChunkedOutputLoss`;
- torchaudio: wav2vec2_model and DeepSpeech trained with CTC (`F.ctc_loss` of the log-softmax), HuBERT's
  pretraining model with its masked-prediction cross-entropy (torchaudio's hubert example), Conformer and
  Emformer as encoders under a linear per-frame classifier, WaveRNN with the cross-entropy of its
  (N, 1, T, 256) classes, ConvTasNet with the negative SI-SNR of its two separated sources.

Runs, each model and run in a process of its own under `--timeout` seconds:

- exact: float64, 2 steps of `gnfx.compile(model, "kfac", lr=1e-3, stat_decay=0.0)`, each forward and backward
  of the compiled model against the original module at the same parameters and random state: the largest
  |difference| of the loss and of any trainable parameter's gradient;
- kfac: at its defaults with `loss=` where the loss is a standard one (the quadratic-model step), else at the
  model's lr without loss= (benchmarks.family_probe.compile_kwargs); shampoo, auto and diag at lr 1e-3 (with
  loss= where standard); adamw: torch.optim.AdamW at lr 1e-3 on the module, the reference.

Per run: the capture's form, the share of the trainable parameters in curvature blocks (and the first
fallback's reason), the losses of `--steps` steps, gnfx's warnings (once each), the seconds; or the error.
None of these libraries is a dependency of gnfx. Results: benchmarks/results/first_contact_10_ultra.md.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import probe_main
from benchmarks.family_probe import compile_kwargs
from benchmarks.lockstep import lockstep_gaps

VOCAB, SEQ, WIDTH = 64, 16, 32
CLASSES = 4  # YOLO's classes, the audio encoders' per-frame classes
RUNS = ("exact", "kfac", "shampoo", "auto", "diag", "adamw")


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.dtype], dict]
    loss_of: Callable[[nn.Module, nn.Module, dict], torch.Tensor]  # (called model, its module, batch) -> loss
    loss: str | None  # gnfx.compile's loss= where the loss is a standard one, else None
    lr: float  # kfac's lr without loss=
    call: str  # the call as its users write it


# ---- ultralytics


def _yolo(cfg: str, kind: str):
    def build():
        from ultralytics.cfg import get_cfg
        from ultralytics.nn import tasks
        model = getattr(tasks, kind)(cfg, nc=CLASSES, verbose=False)
        model.args = get_cfg()  # the trainer's hyperparameters (the loss gains), as BaseTrainer sets them
        return model
    return build


def detection_batch(g, dtype, masks: bool = False):
    """The trainer's batch of 2 images 64×64 with 3 boxes (normalized xywh), and overlapping masks (2, 16, 16)."""
    b = {"img": torch.rand(2, 3, 64, 64, generator=g, dtype=dtype), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
         "cls": torch.tensor([[0.0], [2.0], [1.0]]),
         "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])}
    if masks:
        b["masks"] = torch.randint(0, 3, (2, 16, 16), generator=g).to(dtype)
    return b


def segmentation_batch(g, dtype):
    return detection_batch(g, dtype, masks=True)


def trainer_loss(model, module, b):
    """BaseTrainer: `loss, loss_items = model(batch)`, then `loss.sum().backward()`."""
    return model(b)[0].sum()


def criterion_loss(model, module, b):
    """The model's criterion on the called model's predictions (the validator's form)."""
    return module.loss(b, model(b["img"]))[0].sum()


def image_classes(g, dtype):
    return {"img": torch.rand(4, 3, 32, 32, generator=g, dtype=dtype),
            "cls": torch.randint(0, CLASSES, (4,), generator=g)}


def classification_loss(model, module, b):
    return F.cross_entropy(model(b["img"]), b["cls"])


# ---- torchtune

DECODER = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=WIDTH, max_seq_len=2 * SEQ)
LORA = dict(lora_rank=4, lora_alpha=8.0)


def _tune(module: str, builder: str, lora: bool = False, **kwargs):
    def build():
        import importlib
        model = getattr(importlib.import_module(f"torchtune.models.{module}"), builder)(**kwargs)
        if lora:  # the LoRA recipes: only the adapters train, DoRA's magnitudes set from the initialized weights
            from torchtune.modules.peft import get_adapter_params, set_trainable_params
            set_trainable_params(model, get_adapter_params(model))
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        return model
    return build


def tokens(g, dtype):
    """4 sequences of 16 tokens and their labels, the next tokens, the last -100 (ignored)."""
    t = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    return {"tokens": t, "labels": torch.cat([t[:, 1:], torch.full((4, 1), -100)], 1)}


def token_loss(model, module, b):
    return F.cross_entropy(model(b["tokens"]).reshape(-1, VOCAB), b["labels"].reshape(-1), ignore_index=-100)


def chunked_token_loss(model, module, b):
    """torchtune's full-finetune recipe: the output in chunks of the sequence, CEWithChunkedOutputLoss."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    return CEWithChunkedOutputLoss(num_output_chunks=4)(model(b["tokens"]), b["labels"])


def _chunked():
    model = _tune("llama3_2", "llama3_2", **DECODER)()
    model.set_num_output_chunks(4)
    return model


# ---- torchaudio


def _wav2vec2():
    from torchaudio.models import wav2vec2_model
    return wav2vec2_model(extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2)],
                          extractor_conv_bias=False, encoder_embed_dim=WIDTH, encoder_projection_dropout=0.1,
                          encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4, encoder_num_layers=2,
                          encoder_num_heads=2, encoder_attention_dropout=0.1, encoder_ff_interm_features=64,
                          encoder_ff_interm_dropout=0.1, encoder_dropout=0.1, encoder_layer_norm_first=False,
                          encoder_layer_drop=0.0, aux_num_out=VOCAB // 2)


def _hubert():
    from torchaudio.models import hubert_pretrain_model
    return hubert_pretrain_model(extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2)],
                                 extractor_conv_bias=False, encoder_embed_dim=WIDTH, encoder_projection_dropout=0.1,
                                 encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4, encoder_num_layers=2,
                                 encoder_num_heads=2, encoder_attention_dropout=0.1, encoder_ff_interm_features=64,
                                 encoder_ff_interm_dropout=0.0, encoder_dropout=0.1, encoder_layer_norm_first=False,
                                 encoder_layer_drop=0.0, mask_prob=0.5, mask_selection="static", mask_other=0.0,
                                 mask_length=2, no_mask_overlap=False, mask_min_space=1, mask_channel_prob=0.0,
                                 mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=2,
                                 no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False,
                                 skip_nomask=False, num_classes=VOCAB, final_dim=16, feature_grad_mult=0.1)


def waveforms(g, dtype):
    """2 waveforms of 800 samples (79 frames after the extractor), 8 CTC labels of 31 each, lengths."""
    return {"wav": torch.randn(2, 800, generator=g, dtype=dtype),
            "targets": torch.randint(1, VOCAB // 2, (2, 8), generator=g),
            "lengths": torch.tensor([800, 700])}


def ctc_loss(model, module, b):
    """torchaudio's ASR fine-tuning: CTC of the emissions' log-softmax over the frames' lengths."""
    emissions, lengths = model(b["wav"], b["lengths"])
    log_probs = F.log_softmax(emissions, -1).transpose(0, 1)
    return F.ctc_loss(log_probs, b["targets"], lengths, torch.full((2,), 8), zero_infinity=True)


def hubert_batch(g, dtype):
    return {"wav": torch.randn(2, 800, generator=g, dtype=dtype),
            "labels": torch.randint(0, VOCAB, (2, 79), generator=g),
            "lengths": torch.tensor([800, 800])}


def hubert_loss(model, module, b):
    """torchaudio's hubert example (hubert_loss): cross-entropy of the masked and unmasked frames' logits
    (the positive class first), summed, plus 10 × the feature penalty."""
    logit_m, logit_u, feature_penalty = model(b["wav"], b["labels"], b["lengths"])
    target_m = torch.zeros(logit_m.shape[0], dtype=torch.long)
    target_u = torch.zeros(logit_u.shape[0], dtype=torch.long)
    return (F.cross_entropy(logit_m, target_m, reduction="sum") + F.cross_entropy(logit_u, target_u, reduction="sum")
            + 10 * feature_penalty * logit_m.shape[0])


class FrameClassifier(nn.Module):
    """An encoder `(features, lengths) -> (encoded, lengths)` under a linear per-frame classifier."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(WIDTH // 2, CLASSES)

    def forward(self, features, lengths):
        return self.head(self.encoder(features, lengths)[0])


def _conformer():
    from torchaudio.models import Conformer
    return FrameClassifier(Conformer(input_dim=WIDTH // 2, num_heads=2, ffn_dim=WIDTH, num_layers=2,
                                     depthwise_conv_kernel_size=3, dropout=0.1))


def _emformer():
    from torchaudio.models import Emformer
    return FrameClassifier(Emformer(input_dim=WIDTH // 2, num_heads=2, ffn_dim=WIDTH, num_layers=2, segment_length=4,
                                    right_context_length=1, dropout=0.1))


def frames(right_context: int):
    def batch(g, dtype):
        return {"x": torch.randn(2, 12 + right_context, WIDTH // 2, generator=g, dtype=dtype),
                "lengths": torch.tensor([12 + right_context, 10 + right_context]),
                "y": torch.randint(0, CLASSES, (2, 12), generator=g)}
    return batch


def frame_loss(model, module, b):
    logits = model(b["x"], b["lengths"])
    return F.cross_entropy(logits.reshape(-1, CLASSES), b["y"].reshape(-1))


def _wavernn():
    from torchaudio.models import WaveRNN
    return WaveRNN(upsample_scales=[5, 5], n_classes=256, hop_length=25, n_res_block=2, n_rnn=32, n_fc=32,
                   kernel_size=5, n_freq=16, n_hidden=16, n_output=16)


def wavernn_batch(g, dtype):
    """torchaudio's WaveRNN example: a spectrogram of 6 frames (kernel 5 leaves 2, ×25 = 50 samples), the
    waveform's 50 samples and their 8-bit classes."""
    return {"wav": torch.rand(2, 1, 50, generator=g, dtype=dtype) * 2 - 1,
            "spec": torch.randn(2, 1, 16, 6, generator=g, dtype=dtype),
            "y": torch.randint(0, 256, (2, 50), generator=g)}


def wavernn_loss(model, module, b):
    """The example's LongCrossEntropyLoss: F.cross_entropy of the output (N, T, C) transposed to (N, C, T)."""
    return F.cross_entropy(model(b["wav"], b["spec"]).squeeze(1).transpose(1, 2), b["y"])


def _convtasnet():
    from torchaudio.models import ConvTasNet
    return ConvTasNet(num_sources=2, enc_kernel_size=8, enc_num_feats=16, msk_kernel_size=3, msk_num_feats=8,
                      msk_num_hidden_feats=16, msk_num_layers=2, msk_num_stacks=1)


def mixtures(g, dtype):
    sources = torch.randn(2, 2, 400, generator=g, dtype=dtype)
    return {"mix": sources.sum(1, keepdim=True), "sources": sources}


def si_snr_loss(model, module, b):
    """The negative scale-invariant SNR of the separated sources (torchaudio's source separation example)."""
    estimate, target = model(b["mix"]), b["sources"]
    estimate, target = estimate - estimate.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
    projection = (estimate * target).sum(-1, keepdim=True) * target / target.pow(2).sum(-1, keepdim=True)
    return -(10 * torch.log10(projection.pow(2).sum(-1) / (estimate - projection).pow(2).sum(-1))).mean()


def _deepspeech():
    from torchaudio.models import DeepSpeech
    return DeepSpeech(n_feature=16, n_hidden=WIDTH, n_class=VOCAB // 2, dropout=0.1)


def spectrograms(g, dtype):
    return {"x": torch.randn(2, 1, 20, 16, generator=g, dtype=dtype),
            "targets": torch.randint(1, VOCAB // 2, (2, 6), generator=g)}


def deepspeech_ctc(model, module, b):
    log_probs = model(b["x"]).transpose(0, 1)  # DeepSpeech's output is log_softmax already
    return F.ctc_loss(log_probs, b["targets"], torch.full((2,), 20), torch.full((2,), 6))


MODELS = {
    "yolov8n": Case(_yolo("yolov8n.yaml", "DetectionModel"), detection_batch, trainer_loss, None, 1e-3,
                    "loss, items = model(batch); loss.sum()"),
    "yolov8n_preds": Case(_yolo("yolov8n.yaml", "DetectionModel"), detection_batch, criterion_loss, None, 1e-3,
                          "module.loss(batch, model(batch['img']))[0].sum()"),
    "yolo11n": Case(_yolo("yolo11n.yaml", "DetectionModel"), detection_batch, trainer_loss, None, 1e-3,
                    "loss, items = model(batch); loss.sum()"),
    "yolo11n_preds": Case(_yolo("yolo11n.yaml", "DetectionModel"), detection_batch, criterion_loss, None, 1e-3,
                          "module.loss(batch, model(batch['img']))[0].sum()"),
    "yolov8n_seg_preds": Case(_yolo("yolov8n-seg.yaml", "SegmentationModel"), segmentation_batch, criterion_loss,
                              None, 1e-3, "module.loss(batch, model(batch['img']))[0].sum(), masks"),
    "yolov8n_cls": Case(_yolo("yolov8n-cls.yaml", "ClassificationModel"), image_classes, classification_loss,
                        "cross_entropy", 1e-3, "F.cross_entropy(model(img), cls)"),
    "llama3_2": Case(_tune("llama3_2", "llama3_2", **DECODER), tokens, token_loss, "cross_entropy", 1e-3,
                     "F.cross_entropy(model(tokens).reshape(-1, V), labels.reshape(-1)), tied embeddings"),
    "llama3_2_chunked": Case(_chunked, tokens, chunked_token_loss, None, 1e-3,
                             "set_num_output_chunks(4); CEWithChunkedOutputLoss(model(tokens), labels)"),
    "lora_llama3_2": Case(_tune("llama3_2", "lora_llama3_2", lora=True, lora_attn_modules=["q_proj", "v_proj"],
                                apply_lora_to_mlp=True, **DECODER, **LORA), tokens, token_loss, "cross_entropy", 1e-3,
                          "LoRA on q, v and the MLP; adapters trainable"),
    "dora_llama3_2": Case(_tune("llama3_2", "lora_llama3_2", lora=True, lora_attn_modules=["q_proj", "v_proj"],
                                use_dora=True, **DECODER, **LORA), tokens, token_loss, "cross_entropy", 1e-3,
                          "use_dora=True on q, v; adapters trainable"),
    "qwen2": Case(_tune("qwen2", "qwen2", intermediate_dim=64, tie_word_embeddings=True, **DECODER), tokens, token_loss,
                  "cross_entropy", 1e-3, "tied embeddings (qwen2_0_5b's), q/k/v biases"),
    "lora_qwen2": Case(_tune("qwen2", "lora_qwen2", lora=True, lora_attn_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "output_proj"],
                             intermediate_dim=64, **DECODER, **LORA), tokens, token_loss, "cross_entropy", 1e-3,
                       "LoRA on q, k, v, output; adapters trainable"),
    "gemma": Case(_tune("gemma", "gemma", head_dim=8, intermediate_dim=64, vocab_size=VOCAB, num_layers=2,
                        num_heads=4, num_kv_heads=2, embed_dim=WIDTH, max_seq_len=2 * SEQ), tokens, token_loss,
                  "cross_entropy", 1e-3, "scaled embedding, tied output"),
    "wav2vec2": Case(_wav2vec2, waveforms, ctc_loss, None, 1e-3, "emissions, lengths = model(wav, lengths); CTC"),
    "hubert_pretrain": Case(_hubert, hubert_batch, hubert_loss, None, 1e-3,
                            "logit_m, logit_u, penalty = model(wav, labels, lengths); its loss"),
    "conformer": Case(_conformer, frames(0), frame_loss, "cross_entropy", 1e-3,
                      "Linear(Conformer(x, lengths)[0]), per-frame cross-entropy"),
    "emformer": Case(_emformer, frames(1), frame_loss, "cross_entropy", 1e-3,
                     "Linear(Emformer(x, lengths)[0]), per-frame cross-entropy"),
    "wavernn": Case(_wavernn, wavernn_batch, wavernn_loss, "cross_entropy", 1e-3,
                    "F.cross_entropy(model(wav, spec).squeeze(1).transpose(1, 2), y)"),
    "convtasnet": Case(_convtasnet, mixtures, si_snr_loss, None, 1e-3, "-SI-SNR(model(mixture), sources)"),
    "deepspeech": Case(_deepspeech, spectrograms, deepspeech_ctc, None, 1e-3, "CTC of model(x).transpose(0, 1)"),
}


def trainable(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def exactness(case: Case, steps: int = 2):
    """(the compiled model, 'loss Δ, gradients Δ'): over `steps` kfac steps in float64, the largest |difference|
    of the loss and of any trainable parameter's gradient between the compiled model and the original module
    at the same parameters and the same random state."""
    torch.manual_seed(0)
    model = case.build().double().train()
    reference, b = copy.deepcopy(model), case.batch(torch.Generator().manual_seed(1), torch.float64)
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_decay=0.0)
    # the same dropout masks and random draws in both forwards
    loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, plain: case.loss_of(m, plain, b), steps)
    return c, model, f"loss {loss_gap:.1e}, gradients {grad_gap:.1e}"


def probe(name: str, run: str, steps: int) -> str:
    """One table row: `run` for `steps` steps on one batch of `name`, or its exactness."""
    case = MODELS[name]
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if run == "exact":
            c, model, losses = exactness(case)
        else:
            torch.manual_seed(0)
            model = case.build().train()
            b = case.batch(torch.Generator().manual_seed(1), torch.float32)
            if run == "adamw":
                c, step = model, torch.optim.AdamW(trainable(model).values(), lr=1e-3)
            else:
                c = step = gnfx.compile(model, run, **compile_kwargs(case, run))
            values = []
            for _ in range(steps):
                loss = case.loss_of(c, model, b)
                loss.backward()
                step.step()
                step.zero_grad()
                values.append(f"{loss.item():.3g}")
            losses = ", ".join(values)
    if run == "adamw":
        form = blocks = "–"
    else:
        covered, total = c.layers.coverage(trainable(model))
        fallbacks = c.layers.fallbacks
        form = c.layers.form
        blocks = f"{100 * covered / total:.1f}%" + (f" ({len(fallbacks)} on diag: {fallbacks[0].param}: "
                                                     f"{fallbacks[0].reason[:100]})" if fallbacks else "")
    said = sorted({str(w.message)[:120].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return (f"| {name} | {run} | {form} | {blocks.replace('|', '/')} | {losses} | {'; '.join(said) or '–'} | "
            f"{time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.ultra_probe", probe, {"models": list(MODELS), "runs": list(RUNS)},
               ["| model | run | capture | in blocks | losses (exact: largest differences) | gnfx's warnings | s |",
                "|---|---|---|---|---|---|---|"], steps=3, timeout=300)


if __name__ == "__main__":
    main()
