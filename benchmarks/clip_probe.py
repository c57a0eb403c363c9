"""First contact with open_clip, sentence-transformers and kornia, called as their users call them.

    PYTHONPATH=<torchvision shim>:<torchvision>:<open_clip, sentence_transformers, kornia>:<ftfy, wcwidth,
        kornia_rs>:<timm>:. OMP_NUM_THREADS=1 python -m benchmarks.clip_probe \
        [--models clip_vit st_mnrl] [--optimizers kfac kfac_ce] [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for:

- open_clip (`open_clip.create_model(name, pretrained=None)` from tiny configs registered with
  `open_clip.add_model_config`: embed 32, towers of width 64 and 2 layers, images 32x32 (RN: 64x64),
  texts of 16 random token ids), trained as its users train it, `ClipLoss()(*model(images, texts))` (the
  model returns (image_features, text_features, logit_scale.exp()); the loss is the mean of the
  cross-entropy of the rows and of the columns of `logit_scale · image_features @ text_featuresᵀ`):
  `clip_vit` (ViT towers), `clip_rn` (ModifiedResNet, its attention pool F.multi_head_attention_forward),
  `clip_attnpool` (a ViT with an attentional pooler), `siglip` (SigLIP's towers, `SigLipLoss` with its
  logit bias);
- sentence-transformers (`SentenceTransformer(modules=[models.Transformer(tiny BERT), models.Pooling])`, a
  random BERT of width 32 and 2 layers saved with a 100-word vocabulary): `st_mnrl` trained with
  MultipleNegativesRankingLoss (anchor and positive: two forwards, one backward), `st_cosine` with
  CosineSimilarityLoss (the squared error of the pairs' cosine to a score), `cross_encoder`
  (CrossEncoder(num_labels=1) of that BERT, `binary_cross_entropy_with_logits(model(features)["scores"])`);
- kornia: `kornia_aug` (kornia.augmentation's flip, affine, color jitter and normalization in an
  nn.Sequential before a small CNN, cross-entropy), `hardnet`, `sosnet`, `hynet` (kornia.feature's patch
  descriptors on 32x32 patches, HardNet's hardest-in-batch triplet margin loss over 8 anchor/positive pairs
  in one forward).

Optimizers: "kfac" at its defaults (with loss= where the users' loss is one gnfx models: kornia_aug's
cross-entropy, the CrossEncoder's binary cross-entropy; else without, at its default lr), "kfac_ce"
(loss="cross_entropy" on a contrastive model: what gnfx does with it), "kfac_lr" (lr 1e-3), "shampoo" and
"auto" at lr 1e-3, and for reference torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form,
the share of the trainable parameters in curvature blocks, exactness (the kfac_lr runs: float64, random
augmentation reseeded alike, the compiled model beside a second build from the same seed over 3 steps: the
largest |difference| of the loss and of any gradient), the losses, gnfx's warnings (once each) and the
parameters outside the blocks, the seconds; or the error. None of these libraries is a dependency of gnfx.
The results: benchmarks/results/first_contact_10_clip.md.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.lockstep import float64_gaps

BATCH, TOKENS, VOCAB = 8, 16, 500
WORK = "/tmp/gnfx_clip_probe"  # the tiny configs and the saved BERT
TEXT = {"context_length": TOKENS, "vocab_size": VOCAB, "width": 64, "heads": 4, "layers": 2}
VIT = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16}
OPEN_CLIP = {
    "clip_vit": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT},
    "clip_rn": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                                "head_width": 16}, "text_cfg": TEXT},
    "clip_attnpool": {"embed_dim": 32, "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_queries": 4,
                                                      "attn_pooler_heads": 4}, "text_cfg": TEXT},
    "siglip": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
               "vision_cfg": {**VIT, "no_ln_pre": True, "final_ln_after_pool": True, "pool_type": "avg"},
               "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "last", "proj_type": "linear",
                            "norm_kwargs": {"eps": 1e-6}, "proj_bias": True, "act_kwargs": {"approximate": "tanh"}}},
}
SENTENCE = ("st_mnrl", "st_cosine", "cross_encoder")
KORNIA = ("kornia_aug", "hardnet", "sosnet", "hynet")
MODELS = (*OPEN_CLIP, *SENTENCE, *KORNIA)
CONTRASTIVE = (*OPEN_CLIP, "st_mnrl")  # the users' loss couples the examples of the batch
LOSS = {"kornia_aug": "cross_entropy", "cross_encoder": "binary_cross_entropy"}  # kfac's loss= at its defaults
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_ce": ("kfac", {"loss": "cross_entropy"}),
              "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "auto": ("auto", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.clip_probe", name)


def _tiny_bert() -> str:
    """A random BERT (width 32, 2 layers) and its 100-word tokenizer saved in WORK, as a model path."""
    path = f"{WORK}/tiny_bert"
    if not os.path.exists(f"{path}/config.json"):
        from transformers import BertConfig, BertModel, BertTokenizerFast
        os.makedirs(path, exist_ok=True)
        with open(f"{path}/vocab.txt", "w", encoding="utf-8") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
        BertTokenizerFast(vocab_file=f"{path}/vocab.txt").save_pretrained(path)
        with torch.random.fork_rng():  # the run that saves it draws its dropout masks as the others do
            torch.manual_seed(0)
            BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name in OPEN_CLIP:
        open_clip = _import("open_clip")
        os.makedirs(f"{WORK}/open_clip", exist_ok=True)
        with open(f"{WORK}/open_clip/{name}.json", "w", encoding="utf-8") as f:
            json.dump(OPEN_CLIP[name], f)
        open_clip.add_model_config(f"{WORK}/open_clip")
        return open_clip.create_model(name, pretrained=None)
    if name in SENTENCE:
        st = _import("sentence_transformers")
        if name == "cross_encoder":
            return st.CrossEncoder(_tiny_bert(), num_labels=1, max_length=32)
        modules = st.sentence_transformer.modules
        return st.SentenceTransformer(modules=[modules.Transformer(_tiny_bert(), max_seq_length=TOKENS),
                                               modules.Pooling(32, "mean")])
    kornia = _import("kornia")
    if name == "kornia_aug":
        aug = kornia.augmentation
        return nn.Sequential(aug.RandomHorizontalFlip(), aug.RandomAffine(degrees=10.0, translate=(0.1, 0.1)),
                             aug.ColorJitter(0.1, 0.1, 0.1, 0.1, p=0.5),
                             aug.Normalize(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3)),
                             nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 10))
    return getattr(kornia.feature, {"hardnet": "HardNet", "sosnet": "SOSNet", "hynet": "HyNet"}[name])(pretrained=False)


def _sentences(g: torch.Generator, n: int) -> list[str]:
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 95, (int(torch.randint(3, 12, (1,), generator=g)),),
                                                           generator=g)) for _ in range(n)]


def problem(name: str, model: nn.Module, dtype=torch.float32):
    """(batch, loss(compiled or plain model, batch)) of `name` as its users train it (module doc); `model` is
    the module itself (sentence-transformers' tokenizers and losses are built from it)."""
    g = torch.Generator().manual_seed(1)
    if name in OPEN_CLIP:
        open_clip = _import("open_clip")
        size = OPEN_CLIP[name]["vision_cfg"]["image_size"]
        batch = (torch.randn(BATCH, 3, size, size, generator=g, dtype=dtype),
                 torch.randint(1, VOCAB, (BATCH, TOKENS), generator=g))
        criterion = open_clip.loss.SigLipLoss() if name == "siglip" else open_clip.ClipLoss()
        return batch, lambda m, b: criterion(*m(*b))
    if name == "cross_encoder":
        features = model.preprocess(list(zip(_sentences(g, BATCH), _sentences(g, BATCH))))
        labels = torch.randint(0, 2, (BATCH,), generator=g).to(dtype)
        return (features, labels), lambda m, b: F.binary_cross_entropy_with_logits(m(b[0])["scores"].view(-1), b[1])
    if name in SENTENCE:
        losses = _import("sentence_transformers").sentence_transformer.losses
        features = [dict(model.preprocess(_sentences(g, BATCH))) for _ in range(2)]
        if name == "st_mnrl":
            return (features, torch.arange(BATCH)), lambda m, b: losses.MultipleNegativesRankingLoss(m)(*b)
        scores = torch.rand(BATCH, generator=g, dtype=dtype)
        return (features, scores), lambda m, b: losses.CosineSimilarityLoss(m)(*b)
    if name == "kornia_aug":
        batch = torch.rand(BATCH, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (BATCH,), generator=g)
        return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    patches = torch.rand(2 * BATCH, 1, 32, 32, generator=g, dtype=dtype)

    def hardest_triplet(m, b):  # HardNet's loss: each pair's distance against its hardest non-matching one
        d = m(b)
        anchors, positives = d[:BATCH], d[BATCH:]
        distances = torch.cdist(anchors, positives)
        masked = distances + 10 * torch.eye(BATCH, dtype=d.dtype)
        negative = torch.minimum(masked.min(1).values, masked.min(0).values)
        return F.relu(1.0 + distances.diagonal() - negative).mean()
    return patches, hardest_triplet


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    return kind, hparams


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ': the compiled float64 model beside a second build from the same seed, over 3 steps,
    the random augmentation and dropout reseeded alike before each forward."""
    def loss_for(model):
        batch, loss_of = problem(name, model, torch.float64)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name).train()
        batch, loss_of = problem(name, model)
        return model, lambda c: loss_of(c, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made)


def main() -> None:
    probe_main(__doc__, "benchmarks.clip_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64) | losses | outside the blocks | "
                "gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"], steps=4, timeout=300,
               # kfac_ce, by default, for the contrastive models only
               chosen=lambda name, optimizer, given: optimizer != "kfac_ce" or given or name in CONTRASTIVE)


if __name__ == "__main__":
    main()
