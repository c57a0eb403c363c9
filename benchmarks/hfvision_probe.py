"""First contact with vision and multimodal models beyond image classification, trained as their users do.

    OMP_NUM_THREADS=1 PYTHONPATH=<denoising_diffusion_pytorch, segment_anything and their deps>:. \
        python -m benchmarks.hfvision_probe [--models detr sam] [--runs exact kfac] [--steps 3] [--timeout 300] \
        [--out table.md]

Models from tiny configs with random weights (no download), each called the way its users call it:

- transformers' detectors, `model(pixel_values, labels=[{"class_labels", "boxes"} per image]).loss` (the
  Hungarian matching and the class, L1 and GIoU losses inside the model, scipy's linear_sum_assignment):
  `detr`, `conditional_detr`, `deformable_detr` (a ResNet backbone of transformers, not timm's), `yolos`;
- `sam`: SamModel fine-tuned as Hugging Face's SAM tutorial does, the vision and prompt encoders frozen
  (`requires_grad_(False)`), one box prompt per image, `multimask_output=False`, the dice plus binary
  cross-entropy of the low-resolution `pred_masks` against a mask; `mask2former`, `maskformer`
  (`model(pixel_values, mask_labels, class_labels).loss`, Swin backbones of transformers);
- `vit_gpt2`, `vit_bert` (VisionEncoderDecoderModel, a ViT encoder and a GPT-2 or BERT decoder with
  cross-attention, TrOCR-like: `model(pixel_values, labels).loss`), `blip` (BlipForConditionalGeneration,
  `model(pixel_values, input_ids, labels=input_ids).loss`), `blip2` (Blip2ForConditionalGeneration, an OPT
  language model, the vision tower and the language model frozen as its users fine-tune the Q-Former),
  `layoutlmv3` (LayoutLMv3ForTokenClassification, its patch embedding, no detectron2: `model(input_ids,
  bbox, pixel_values, labels)`), `owlvit`, `owlv2` (`OwlViTModel`/`Owlv2Model(..., return_loss=True)`,
  the contrastive image-text loss);
- lucidrains' denoising-diffusion-pytorch, `GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16)`,
  `loss = diffusion(images)` (the model draws t and the noise and returns its loss); Meta's
  segment_anything (`sam_meta`): `Sam` of its ImageEncoderViT, PromptEncoder and MaskDecoder at tiny sizes in
  MedSAM's module (Sam's own forward runs under torch.no_grad; MedSAM calls the parts: the image encoder
  and the mask decoder trained, the prompt encoder frozen and run under no_grad), the same dice plus cross-entropy of the low-resolution logits.

Runs, each model and run in a process of its own under `--timeout` seconds:

- exact: float64 (segment_anything: float32, FLOAT32_ONLY), 2 steps of `gnfx.compile(model, "kfac", lr=1e-3, stat_decay=0.0)` beside the module
  (benchmarks.lockstep: the same random state before each forward): the largest |difference| of the loss
  and of any trainable parameter's gradient; and the first step's K-FAC factors A and S of every nn.Linear
  block the backward reached against plain hooks on the module (benchmarks.hooked_calls, benchmarks.diffusers_probe's
  linear_factors: A the mean of ā āᵀ over the rows the backward reached, S = M Σ g gᵀ with M the rows of
  the model's first floating output of two or more dimensions that the loss reached, or the layer's
  examples for a model that returns its loss alone), the largest
  |difference| relative to the factor's largest entry over all linear blocks;
- kfac (defaults: no loss=, these losses are the models' own), kfac_lr (lr 1e-3), shampoo, diag, auto (lr
  1e-3); adamw: torch.optim.AdamW at lr 1e-3 on the trainable parameters, the reference.

Per run: the capture's form, the share of the trainable parameters in curvature blocks (with the first
fallback's reason), the losses of `--steps` steps on one batch, gnfx's warnings (once each), the seconds;
or the error. None of these libraries is a dependency of gnfx. Results:
benchmarks/results/first_contact_11_hfvision.md.
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
from benchmarks.child_rows import library, probe_main
from benchmarks.diffusers_probe import linear_factors
from benchmarks.hooked_calls import hooked_calls
from benchmarks.lockstep import lockstep_gaps

BATCH, CLASSES, VOCAB, TOKENS = 2, 3, 48, 8
RUNS = {"exact": None, "kfac": {}, "kfac_lr": {"lr": 1e-3}, "shampoo": {"lr": 1e-3}, "diag": {"lr": 1e-3},
        "auto": {"lr": 1e-3}, "adamw": {"lr": 1e-3}}


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.dtype], dict]
    loss_of: Callable[[nn.Module, dict], torch.Tensor]  # (called model, batch) -> loss
    call: str  # the call as its users write it


def _tf():
    return __import__("transformers")


def _import(name: str):
    return library("benchmarks.hfvision_probe", name)


# ---- detection: transformers' DETR family and YOLOS, the Hungarian loss inside the model


def _resnet(stages: list[str]):
    return _tf().ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              layer_type="basic", out_features=stages)


DETR = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_labels=CLASSES, use_timm_backbone=False,
            use_pretrained_backbone=False, auxiliary_loss=False)


def _detr():
    return _tf().DetrForObjectDetection(_tf().DetrConfig(backbone_config=_resnet(["stage2"]), d_model=16, **DETR))


def _conditional_detr():
    config = _tf().ConditionalDetrConfig(backbone_config=_resnet(["stage2"]), d_model=16, **DETR)
    return _tf().ConditionalDetrForObjectDetection(config)


def _deformable_detr():  # its GroupNorm has 32 groups: d_model 32; its tied box heads want 2 decoder layers
    config = _tf().DeformableDetrConfig(backbone_config=_resnet(["stage1", "stage2"]), d_model=32,
                                        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2,
                                        **{**DETR, "decoder_layers": 2})
    return _tf().DeformableDetrForObjectDetection(config)


def _yolos():
    return _tf().YolosForObjectDetection(_tf().YolosConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=[32, 32],
        patch_size=8, num_detection_tokens=6, num_labels=CLASSES, auxiliary_loss=False))


def _boxes(g, dtype, counts=(2, 3)):
    """Per image: `count` class labels and boxes (cx, cy, w, h) in [0.25, 0.75]."""
    return [{"class_labels": torch.randint(0, CLASSES, (k,), generator=g),
             "boxes": (torch.rand(k, 4, generator=g) * 0.5 + 0.25).to(dtype)} for k in counts]


def detection_batch(g, dtype, size: int = 64):
    return dict(pixel_values=torch.randn(BATCH, 3, size, size, generator=g).to(dtype), labels=_boxes(g, dtype))


def model_loss(model, b):
    return model(**b)["loss"]


# ---- segmentation: SAM (frozen encoders), Mask2Former, MaskFormer


def _sam():
    tf = _tf()
    model = tf.SamModel(tf.SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=32,
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16)))
    for name, p in model.named_parameters():  # Hugging Face's SAM fine-tuning tutorial: the mask decoder only
        if name.startswith(("vision_encoder", "prompt_encoder")):
            p.requires_grad_(False)
    return model


def sam_batch(g, dtype):
    """Images (64 pixels), one box prompt each, the (BATCH, 16, 16) masks of the low-resolution logits."""
    masks = torch.zeros(BATCH, 16, 16, dtype=dtype)
    masks[0, 4:10, 3:12], masks[1, 8:15, 2:7] = 1, 1
    return dict(pixel_values=torch.randn(BATCH, 3, 64, 64, generator=g).to(dtype),
                input_boxes=torch.tensor([[[12.0, 16.0, 48.0, 40.0]], [[8.0, 32.0, 28.0, 60.0]]], dtype=dtype),
                masks=masks)


def dice_ce(logits, masks):
    """The tutorial's monai DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean"), written out."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * masks).sum((-2, -1)) + 1e-5) / ((p * p).sum((-2, -1)) + (masks * masks).sum((-2, -1)) + 1e-5)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, masks)


def sam_loss(model, b):
    out = model(pixel_values=b["pixel_values"], input_boxes=b["input_boxes"], multimask_output=False)
    return dice_ce(out.pred_masks.squeeze(1).squeeze(1), b["masks"])


def _swin(**extra):
    return _tf().SwinConfig(image_size=64, patch_size=4, num_channels=3, embed_dim=8, depths=[1, 1, 1, 1],
                            num_heads=[1, 1, 2, 2], window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"],
                            **extra)


def _mask2former():
    tf = _tf()
    return tf.Mask2FormerForUniversalSegmentation(tf.Mask2FormerConfig(
        backbone_config=_swin(), use_pretrained_backbone=False, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        num_queries=6, num_labels=CLASSES, train_num_points=64, common_stride=4))


def _maskformer():
    tf = _tf()
    return tf.MaskFormerForInstanceSegmentation(tf.MaskFormerConfig(
        backbone_config=_swin(), decoder_config=dict(model_type="detr", d_model=32, encoder_layers=1, decoder_layers=1,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=32, decoder_ffn_dim=32),
        fpn_feature_size=32, mask_feature_size=32, num_queries=6, num_labels=CLASSES, use_auxiliary_loss=False))


def mask_batch(g, dtype):
    """Images (64 pixels) and per image its instances' binary masks (k, 64, 64) and classes."""
    masks = []
    for k in (2, 3):
        m = torch.zeros(k, 64, 64, dtype=dtype)
        for i in range(k):
            x, y = torch.randint(0, 40, (2,), generator=g).tolist()
            m[i, y:y + 20, x:x + 20] = 1
        masks.append(m)
    return dict(pixel_values=torch.randn(BATCH, 3, 64, 64, generator=g).to(dtype), mask_labels=masks,
                class_labels=[torch.randint(0, CLASSES, (len(m),), generator=g) for m in masks])


# ---- image to text, documents, open-vocabulary detection


def _tokens(g, count: int = TOKENS):
    """Token ids (BATCH, count) from 3 on, the first sequence padded (id 1) in its last 2, and its mask."""
    ids = torch.randint(3, VOCAB, (BATCH, count), generator=g)
    mask = torch.ones(BATCH, count, dtype=torch.long)
    mask[0, -2:], ids[0, -2:] = 0, 1
    return ids, mask


VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
           patch_size=8)


def _vision_encoder_decoder(decoder: str):
    tf = _tf()
    if decoder == "gpt2":
        text = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                             eos_token_id=2, pad_token_id=1)
    else:
        text = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32, pad_token_id=1)
    config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(tf.ViTConfig(**VIT), text)
    config.decoder_start_token_id, config.pad_token_id = 0, 1
    return tf.VisionEncoderDecoderModel(config=config)


def caption_batch(g, dtype):
    """Images (32 pixels) and their captions as labels, -100 on the padding (what TrOCR's collators give)."""
    ids, mask = _tokens(g)
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype), labels=ids.masked_fill(mask == 0, -100))


def _blip():
    tf = _tf()
    return tf.BlipForConditionalGeneration(tf.BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=VOCAB, hidden_size=16, encoder_hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, pad_token_id=1,
                         bos_token_id=0, sep_token_id=2),
        projection_dim=16))


def blip_batch(g, dtype):
    """BLIP's captioning call: the caption both as input_ids and as labels (the model shifts them)."""
    ids, mask = _tokens(g)
    ids[:, 0] = 0  # its [DEC] (bos) token first
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype), input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill(mask == 0, -100))


BLIP2_IMAGE_TOKEN, BLIP2_QUERIES = VOCAB - 1, 4


def _blip2():
    tf = _tf()
    model = tf.Blip2ForConditionalGeneration(tf.Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, encoder_hidden_size=16, max_position_embeddings=32),
        text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
        num_query_tokens=BLIP2_QUERIES, image_token_index=BLIP2_IMAGE_TOKEN))
    for name, p in model.named_parameters():  # the Q-Former and its projection trained, as BLIP-2's fine-tuning
        if name.startswith(("vision_model", "language_model")):
            p.requires_grad_(False)
    return model


def blip2_batch(g, dtype):
    """The query tokens' places (image token ids) before each caption, labels -100 on them and the padding."""
    ids, mask = _tokens(g)
    ids = torch.cat([torch.full((BATCH, BLIP2_QUERIES), BLIP2_IMAGE_TOKEN), ids.clamp(max=VOCAB - 2)], 1)
    mask = torch.cat([torch.ones(BATCH, BLIP2_QUERIES, dtype=torch.long), mask], 1)
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype), input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill((mask == 0) | (ids == BLIP2_IMAGE_TOKEN), -100))


def _layoutlmv3():
    tf = _tf()
    return tf.LayoutLMv3ForTokenClassification(tf.LayoutLMv3Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, max_2d_position_embeddings=64, coordinate_size=3, shape_size=2, input_size=32,
        patch_size=8, rel_pos_bins=8, max_rel_pos=16, rel_2d_pos_bins=8, max_rel_2d_pos=32, num_labels=CLASSES,
        pad_token_id=1))


def layout_batch(g, dtype):
    """Words with their boxes (x0, y0, x1, y1 in [0, 63]), the page image, a class per word (-100 on the padding)."""
    ids, mask = _tokens(g)
    corner = torch.randint(0, 48, (BATCH, TOKENS, 2), generator=g)
    boxes = torch.cat([corner, corner + torch.randint(1, 16, (BATCH, TOKENS, 2), generator=g)], -1)
    labels = torch.randint(0, CLASSES, (BATCH, TOKENS), generator=g).masked_fill(mask == 0, -100)
    return dict(input_ids=ids, bbox=boxes, attention_mask=mask, pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype),
                labels=labels)


def _owl(kind: str):
    tf = _tf()
    config = getattr(tf, f"{kind}Config")(
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=TOKENS, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return getattr(tf, f"{kind}Model")(config)


def contrastive_batch(g, dtype):
    ids, mask = _tokens(g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype),
                return_loss=True)


# ---- denoising-diffusion-pytorch, segment_anything


def _gaussian_diffusion():
    ddp = _import("denoising_diffusion_pytorch")
    return ddp.GaussianDiffusion(ddp.Unet(dim=8, dim_mults=(1, 2), flash_attn=False), image_size=16, timesteps=100)


def images_01(g, dtype):
    return dict(img=torch.rand(BATCH, 3, 16, 16, generator=g).to(dtype))


def diffusion_loss(model, b):
    return model(b["img"])


class MedSam(nn.Module):
    """MedSAM's wrapper of segment_anything's Sam (whose own forward runs under torch.no_grad): the image
    embedding, the box prompt's embeddings without gradient, the mask decoder's low-resolution logits, one
    image at a time as Sam.forward does (segment_anything's decoder repeats one image's embedding per prompt)."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = sam.image_encoder, sam.prompt_encoder, sam.mask_decoder

    def forward(self, image, boxes):
        image_embedding = self.image_encoder(image)
        logits = []
        for embedding, box in zip(image_embedding, boxes):
            with torch.no_grad():
                sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=None)
            logits.append(self.mask_decoder(image_embeddings=embedding[None], image_pe=self.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)[0])
        return torch.cat(logits)


def _sam_meta():
    _import("segment_anything")
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    model = MedSam(Sam(ImageEncoderViT(img_size=64, patch_size=16, in_chans=3, embed_dim=16, depth=2, num_heads=2,
                                       mlp_ratio=2.0, out_chans=16, qkv_bias=True, use_rel_pos=True, window_size=2,
                                       global_attn_indexes=(1,)),
                       PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
                       MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                           depth=2, embedding_dim=16, mlp_dim=32, num_heads=2), transformer_dim=16, iou_head_depth=3,
                           iou_head_hidden_dim=16)))
    model.prompt_encoder.requires_grad_(False)  # MedSAM's training: the image encoder and the mask decoder
    return model


def sam_meta_loss(model, b):
    return dice_ce(model(b["pixel_values"], b["input_boxes"]).squeeze(1), b["masks"])


MODELS = {
    "detr": Case(_detr, detection_batch, model_loss, "model(pixel_values, labels=[{class_labels, boxes}]).loss"),
    "conditional_detr": Case(_conditional_detr, detection_batch, model_loss, "same"),
    "deformable_detr": Case(_deformable_detr, detection_batch, model_loss, "same"),
    "yolos": Case(_yolos, lambda g, dtype: detection_batch(g, dtype, 32), model_loss, "same"),
    "sam": Case(_sam, sam_batch, sam_loss, "dice + BCE of model(pixel_values, input_boxes, multimask_output=False)"
                ".pred_masks, vision and prompt encoders frozen"),
    "mask2former": Case(_mask2former, mask_batch, model_loss, "model(pixel_values, mask_labels, class_labels).loss"),
    "maskformer": Case(_maskformer, mask_batch, model_loss, "same"),
    "vit_gpt2": Case(lambda: _vision_encoder_decoder("gpt2"), caption_batch, model_loss, "model(pixel_values, labels).loss"),
    "vit_bert": Case(lambda: _vision_encoder_decoder("bert"), caption_batch, model_loss, "same"),
    "blip": Case(_blip, blip_batch, model_loss, "model(pixel_values, input_ids, attention_mask, labels).loss"),
    "blip2": Case(_blip2, blip2_batch, model_loss, "same, vision tower and OPT frozen"),
    "layoutlmv3": Case(_layoutlmv3, layout_batch, model_loss, "model(input_ids, bbox, attention_mask, pixel_values, labels).loss"),
    "owlvit": Case(lambda: _owl("OwlViT"), contrastive_batch, model_loss, "model(input_ids, attention_mask, pixel_values, return_loss=True).loss"),
    "owlv2": Case(lambda: _owl("Owlv2"), contrastive_batch, model_loss, "same"),
    "gaussian_diffusion": Case(_gaussian_diffusion, images_01, diffusion_loss, "GaussianDiffusion(Unet(...))(images)"),
    "sam_meta": Case(_sam_meta, sam_batch, sam_meta_loss, "dice + BCE of MedSAM's module (the prompt encoder "
                     "frozen and under no_grad, the mask decoder's low-resolution logits)"),
}


def trainable(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _first_output_gradient(model: nn.Module, at_z: dict):
    """A forward hook on `model` recording in at_z[i] the gradient at its i-th floating output of 2 or more
    dimensions, for those the backward reaches: at_z[min(at_z)] is the first (SAM returns its IoU scores
    first, which its users' loss does not use)."""
    def hook(_, __, out):
        leaves = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
        outputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2
                   and t.requires_grad]
        for i, z in enumerate(outputs):
            z.register_hook(lambda g, i=i: at_z.update({i: g}))
    return model.register_forward_hook(hook)


# segment_anything casts its prompts' coordinates to float32 itself (PositionEmbeddingRandom: `coords.to(torch.float)`
# against its Gaussian matrix): the module does not run in float64
FLOAT32_ONLY = ("sam_meta",)


def exactness(name: str, steps: int = 2):
    """(the compiled model, the module, 'loss Δ, gradients Δ; A, S Δ of k linear blocks'): the lockstep gaps of
    `steps` kfac steps in float64 (float32 for FLOAT32_ONLY), and the first step's factors of the linear blocks
    against hooks (module doc). The default dtype too: the DETR losses build their class weights at each call."""
    dtype = torch.float32 if name in FLOAT32_ONLY else torch.float64
    torch.set_default_dtype(dtype)
    try:
        return _exactness(MODELS[name], steps, dtype)
    finally:
        torch.set_default_dtype(torch.float32)


def _exactness(case: Case, steps: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = case.build().to(dtype).train()
    reference, b = copy.deepcopy(model), case.batch(torch.Generator().manual_seed(1), dtype)
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_decay=0.0)
    # the first step: its statistics against hooks on the module (kfac refreshes them on a schedule after it)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    at_z = {}
    handle = _first_output_gradient(reference, at_z)
    try:
        with hooked_calls(reference, list(linears)) as calls:
            loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: case.loss_of(m, b), 1)
    finally:
        handle.remove()
    blocks = [block.name for block in c.layers if block.name in linears]
    pairs = {"A": [], "S": []}  # (gnfx's, the hooks') of each block the backward reached
    for block in blocks:
        if any(record[1] is not None for record in calls[block]):
            # a model returning its loss alone (GaussianDiffusion): N the layer's examples, T = 1 (gnfx.statistics)
            z_grad = at_z[min(at_z)] if at_z else torch.ones(calls[block][0][0].shape[0], 1)
            want = linear_factors(calls[block], linears[block].bias is not None, z_grad)
            for key, expected in zip("AS", want):
                pairs[key].append((c.statistics(block)[key], expected))
    # relative to the factor's largest entry over the blocks: a block whose gradient is exactly 0 has S = 0
    factor_gap = {key: max((got - want).abs().max().item() for got, want in found) /
                  max(want.abs().max().item() for _, want in found) for key, found in pairs.items()}
    gaps = lockstep_gaps(c, model, reference, lambda m, _: case.loss_of(m, b), steps - 1, seed=1)
    loss_gap, grad_gap = max(loss_gap, gaps[0]), max(grad_gap, gaps[1])
    return c, model, (f"loss {loss_gap:.0e}, gradients {grad_gap:.0e}; A {factor_gap['A']:.0e}, S {factor_gap['S']:.0e} "
                      f"of {len(pairs['A'])} linear blocks")


def probe(name: str, run: str, steps: int) -> str:
    """One table row: `run` (RUNS) for `steps` steps on one batch of `name`, or its exactness."""
    case = MODELS[name]
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if run == "exact":
            c, model, losses = exactness(name)
        else:
            torch.manual_seed(0)
            model = case.build().train()
            b = case.batch(torch.Generator().manual_seed(1), torch.float32)
            if run == "adamw":
                c, step = model, torch.optim.AdamW(trainable(model).values(), **RUNS[run])
            else:
                c = step = gnfx.compile(model, run.removesuffix("_lr"), **RUNS[run])
            values = []
            for _ in range(steps):
                loss = case.loss_of(c, b)
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
    said = sorted({str(w.message)[:160].replace("|", "/").replace("\n", " ") + "..." for w in caught
                   if str(w.message).startswith("gnfx")})
    return (f"| {name} | {run} | {form} | {blocks.replace('|', '/')} | {losses} | {'; '.join(said) or '–'} | "
            f"{time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.hfvision_probe", probe, {"models": list(MODELS), "runs": list(RUNS)},
               ["| model | run | capture | in blocks | losses (exact: largest differences) | gnfx's warnings | s |",
                "|---|---|---|---|---|---|---|"], steps=3, timeout=300)


if __name__ == "__main__":
    main()
