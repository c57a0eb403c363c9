"""First contact with real Hugging Face transformers models: tiny configs, called as their users call them.

    OMP_NUM_THREADS=1 python -m benchmarks.hf_zoo [--models t5 clip] [--steps 15] [--out table.md]

Each model is built from a tiny config (no download: one or two layers, hidden size 8-16, a vocabulary
of 48) and called the way its users call it, `out = model(**batch); out.loss.backward()` with the
labels inside (-100 on the padding and on the unmasked tokens, attention masks with a padded
sequence, pixel_values, input_features, CLIP's and SigLIP's `return_loss=True`, Segformer's class
masks); Wav2Vec2ForCTC both with its labels and with the CTC loss taken outside (`F.ctc_loss` of the
logits, as the model computes it); DeiTForImageClassificationWithTeacher, which takes no labels, with
`F.cross_entropy(out.logits, labels)` outside. `gnfx.compile` runs before the first call (capture at
that call). Per model:

- exactness: in float64 (float32 for GROUPED_EXPERTS) with dropout off, 3 kfac steps at defaults
  (without `loss=` and at lr 0.01 for NOT_CROSS_ENTROPY: CLIP's and SigLIP's contrastive losses, CTC, Segformer's cross-entropy of its
  logits upsampled to the mask), each forward and backward of
  the compiled model against the original module at the same parameters: the largest differences of
  the loss, the logits and any gradient;
- kfac at its defaults, `loss="cross_entropy"` and no lr (the quadratic-model step, `fisher="mc"`),
  and shampoo at lr 0.01 (and kfac at lr 0.01 without `loss=` for NOT_CROSS_ENTROPY), `--steps` steps on one batch with dropout on: the route (fx or export), the
  share of trainable parameters in curvature blocks, the losses, the first error, the warnings and
  the fallback parameters with their reasons.

The results: benchmarks/results/first_contact_5.md (text, speech, CLIP), and for the models added
since, benchmarks/results/first_contact_6_text.md (text) and first_contact_6_vision.md (vision, audio
and multimodal); for Llama, Qwen3, Gemma3, DeepSeek-V3, ModernBERT, LLaVA and the others of transformers 5.24,
benchmarks/results/first_contact_9_hf.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import warnings

import torch
import torch.nn.functional as F

import gnfx

VOCAB, BATCH, T = 48, 4, 8


def _ids(g):
    """Token ids (BATCH, T) and their attention mask, the first sequence padded (pad id 1) in its last 3."""
    ids = torch.randint(3, VOCAB, (BATCH, T), generator=g)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    mask[0, -3:], ids[0, -3:] = 0, 1
    return ids, mask


def _targets(g):
    """Decoder labels (BATCH, 5), the second sequence's last 2 ignored (-100)."""
    labels = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    labels[1, -2:] = -100
    return labels


def seq2seq_batch(g):
    ids, mask = _ids(g)
    return dict(input_ids=ids, attention_mask=mask, labels=_targets(g))


def classification_batch(g):
    ids, mask = _ids(g)
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 3, (BATCH,), generator=g))


def masked_lm_batch(g):
    """30% of the unpadded tokens (and every second token) masked with id 3; labels -100 elsewhere."""
    ids, mask = _ids(g)
    picked = torch.rand(ids.shape, generator=g) < 0.3
    picked[:, 1] = True
    picked &= mask.bool()
    labels = torch.full_like(ids, -100).masked_scatter(picked, ids[picked])
    return dict(input_ids=ids.masked_fill(picked, 3), attention_mask=mask, labels=labels)


def unmasked_lm_batch(g):
    """The masked LM's batch without its attention mask (FNet takes none)."""
    values = masked_lm_batch(g)
    del values["attention_mask"]
    return values


def replaced_token_batch(g):
    """ELECTRA's discriminator batch: 30% of the unpadded tokens replaced by other ids, labelled 1, others 0."""
    ids, mask = _ids(g)
    replaced = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    other = (ids - 3 + torch.randint(1, VOCAB - 3, ids.shape, generator=g)) % (VOCAB - 3) + 3
    return dict(input_ids=torch.where(replaced, other, ids), attention_mask=mask, labels=replaced.long())


def causal_lm_batch(g):
    ids, mask = _ids(g)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def image_batch(g):
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g), labels=torch.randint(0, 3, (BATCH,), generator=g))


def ctc_batch(g):
    """400 samples of audio, the first example padded after 300; 6 labels, the first's last 2 ignored."""
    audio, mask = torch.randn(BATCH, 400, generator=g), torch.ones(BATCH, 400, dtype=torch.long)
    mask[0, 300:], audio[0, 300:] = 0, 0.0
    labels = torch.randint(1, 12, (BATCH, 6), generator=g)
    labels[0, 4:] = -100
    return dict(input_values=audio, attention_mask=mask, labels=labels)


def speech_batch(g):
    return dict(input_features=torch.randn(BATCH, 8, 32, generator=g), labels=_targets(g))


def small_image_batch(g):
    """16-pixel images, for the models that downsample 16 times (LeViT) or hold a position table per patch."""
    return dict(pixel_values=torch.randn(BATCH, 3, 16, 16, generator=g), labels=torch.randint(0, 3, (BATCH,), generator=g))


def segmentation_batch(g):
    """32-pixel images and their (BATCH, 32, 32) class masks, a corner of the first ignored (255)."""
    labels = torch.randint(0, 3, (BATCH, 32, 32), generator=g)
    labels[0, :8, :8] = 255
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g), labels=labels)


def audio_classification_batch(g):
    """ctc_batch's audio (the first example padded) with one class per example."""
    values = ctc_batch(g)
    return dict(values, labels=torch.randint(0, 3, (BATCH,), generator=g))


def spectrogram_batch(g):
    """AST's input: (BATCH, 32 frames, 16 mel bins) with one class per example."""
    return dict(input_values=torch.randn(BATCH, 32, 16, generator=g), labels=torch.randint(0, 3, (BATCH,), generator=g))


def filterbank_batch(g):
    """Speech2Text's input: (BATCH, 32 frames, 8 filterbank features), with seq2seq labels."""
    return dict(input_features=torch.randn(BATCH, 32, 8, generator=g), labels=_targets(g))


def clip_batch(g):
    ids, mask = _ids(g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(BATCH, 3, 16, 16, generator=g),
                return_loss=True)


LLAVA_IMAGE_TOKEN = VOCAB - 1


def llava_batch(g):
    """The causal LM's batch with 4 image tokens (one 16-pixel image of 4 patches) before each sequence's
    text, left-padded, and the image's pixels; labels -100 on the image tokens and the padding."""
    ids, mask = _ids(g)
    ids, mask = ids.clamp(max=VOCAB - 2).flip(-1), mask.flip(-1)
    ids = torch.cat([torch.full((BATCH, 4), LLAVA_IMAGE_TOKEN), ids], 1)
    mask = torch.cat([torch.ones(BATCH, 4, dtype=torch.long), mask], 1)
    labels = ids.masked_fill((mask == 0) | (ids == LLAVA_IMAGE_TOKEN), -100)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(BATCH, 3, 16, 16, generator=g),
                labels=labels)


QWEN2_VL_IMAGE, QWEN2_VL_START, QWEN2_VL_END = VOCAB - 1, VOCAB - 2, VOCAB - 4  # VOCAB - 3: its video token


def qwen2_vl_batch(g):
    """Each sequence: <vision_start>, 4 image tokens, <vision_end>, then the causal LM's text (ids below
    the special ones); one image each as its processor gives it: 16 patches (a 1 x 4 x 4 grid, merged
    2 x 2 into the 4 tokens) of 3 channels x 2 frames x 4 x 4 pixels, their grid and the tokens' types
    (1 on the image tokens, for the 3-D rotary positions). Labels -100 on the vision tokens and padding."""
    ids, mask = _ids(g)
    vision = torch.tensor([QWEN2_VL_START] + [QWEN2_VL_IMAGE] * 4 + [QWEN2_VL_END]).expand(BATCH, -1)
    ids = torch.cat([vision, ids.clamp(max=VOCAB - 5)], 1)
    mask = torch.cat([torch.ones(BATCH, 6, dtype=torch.long), mask], 1)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(BATCH * 16, 96, generator=g),
                image_grid_thw=torch.tensor([[1, 4, 4]] * BATCH), mm_token_type_ids=(ids == QWEN2_VL_IMAGE).long(),
                labels=ids.masked_fill((mask == 0) | (ids >= VOCAB - 4), -100))


def _config(name: str, p: float):
    """The tiny config of model `name` with dropout probability p."""
    import transformers as tf
    tokens = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    causal = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, attention_dropout=p, **tokens)
    seq2seq = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=p, attention_dropout=p,
                   activation_dropout=p, **tokens)
    deberta = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=32, relative_attention=True, position_buckets=8, max_relative_positions=16,
                   pos_att_type=["p2c", "c2p"], position_biased_input=False, num_labels=3, hidden_dropout_prob=p,
                   attention_probs_dropout_prob=p, pooler_dropout=p, pad_token_id=1)
    vit = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=p,
               attention_probs_dropout_prob=p, num_labels=3)
    audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                 conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                 hidden_dropout=p, attention_dropout=p, activation_dropout=p, feat_proj_dropout=p, final_dropout=p,
                 layerdrop=0.0, mask_time_prob=0.0, feat_extract_norm="group")
    modernbert = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, local_attention=4, layer_types=["full_attention", "sliding_attention"],
                      attention_dropout=p, embedding_dropout=p, mlp_dropout=p, classifier_dropout=p, cls_token_id=0,
                      sep_token_id=2, **tokens)
    return {
        "t5": lambda: tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                  num_heads=2, relative_attention_num_buckets=8, dropout_rate=p,
                                  decoder_start_token_id=0, pad_token_id=1, eos_token_id=2),
        "bart": lambda: tf.BartConfig(max_position_embeddings=32, decoder_start_token_id=2, forced_eos_token_id=None,
                                      **seq2seq),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                                  max_position_embeddings=32, dropout=p, attention_dropout=p,
                                                  seq_classif_dropout=p, num_labels=3, pad_token_id=1),
        "roberta_mlm": lambda: tf.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                                hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=1),
        "qwen2": lambda: tf.Qwen2Config(**causal),
        "mistral": lambda: tf.MistralConfig(sliding_window=4, **causal),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32, rotary_pct=0.5,
                                             attention_dropout=p, hidden_dropout=p, **tokens),
        "gpt2_cls": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3,
                                          resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **tokens),
        "resnet": lambda: tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                          layer_type="basic", num_labels=3),
        "convnext": lambda: tf.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=3, patch_size=4, drop_path_rate=p),
        "swin": lambda: tf.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=8, depths=[2, 1],
                                      num_heads=[2, 2], window_size=4, num_labels=3, hidden_dropout_prob=p,
                                      attention_probs_dropout_prob=p, drop_path_rate=p),
        "wav2vec2_ctc": lambda: tf.Wav2Vec2Config(
            vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2, hidden_dropout=p, attention_dropout=p, activation_dropout=p,
            feat_proj_dropout=p, final_dropout=p, layerdrop=0.0, mask_time_prob=0.0, pad_token_id=0,
            ctc_loss_reduction="mean", feat_extract_norm="group"),
        "whisper": lambda: tf.WhisperConfig(num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                                            decoder_start_token_id=0, suppress_tokens=None, begin_suppress_tokens=None,
                                            **seq2seq),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    max_position_embeddings=32, word_embed_proj_dim=16, num_attention_heads=2,
                                    dropout=p, attention_dropout=p, **tokens),
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2, hidden_dropout=p,
                                        attention_dropout=p, **tokens),
        "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          max_position_embeddings=32, hidden_dropout=p, attention_dropout=p, **tokens),
        "phi": lambda: tf.PhiConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32, resid_pdrop=p, embd_pdrop=p,
                                    attention_dropout=p, **tokens),
        "gemma2": lambda: tf.Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=32, sliding_window=4,
                                          layer_types=["sliding_attention", "full_attention"], attention_dropout=p,
                                          **tokens),
        "gptj": lambda: tf.GPTJConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, rotary_dim=4,
                                      n_inner=32, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **tokens),
        "electra": lambda: tf.ElectraConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                            hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=1),
        "albert_mlm": lambda: tf.AlbertConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                              num_hidden_groups=1, num_attention_heads=2, intermediate_size=32,
                                              max_position_embeddings=32, hidden_dropout_prob=p,
                                              attention_probs_dropout_prob=p, classifier_dropout_prob=p, **tokens),
        "deberta_v2_cls": lambda: tf.DebertaV2Config(**deberta),
        # its single-label loss without the branch on `(labels >= 0).nonzero().size(0) > 0`
        "deberta_v2_cls_typed": lambda: tf.DebertaV2Config(problem_type="single_label_classification", **deberta),
        "xlnet": lambda: tf.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=32, dropout=p,
                                        **tokens),
        "mbart": lambda: tf.MBartConfig(max_position_embeddings=32, decoder_start_token_id=2, forced_eos_token_id=None,
                                        **seq2seq),
        "marian": lambda: tf.MarianConfig(max_position_embeddings=32, decoder_start_token_id=1, forced_eos_token_id=None,
                                          **seq2seq),
        "mamba": lambda: tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                        conv_kernel=4, time_step_rank=4, **tokens),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **causal),
        "fnet_mlm": lambda: tf.FNetConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                          max_position_embeddings=32, hidden_dropout_prob=p, **tokens),
        "squeezebert_cls": lambda: tf.SqueezeBertConfig(
            vocab_size=VOCAB, hidden_size=16, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=p,
            attention_probs_dropout_prob=p, pad_token_id=1),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                                   n_inner=32, multi_query=True, resid_pdrop=p, embd_pdrop=p,
                                                   attn_pdrop=p, **tokens),
        "mobilebert_mlm": lambda: tf.MobileBertConfig(
            vocab_size=VOCAB, hidden_size=16, embedding_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, intra_bottleneck_size=8, num_feedforward_networks=2, max_position_embeddings=32,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=1),
        "olmo": lambda: tf.OlmoConfig(clip_qkv=8.0, **causal),
        "clip": lambda: tf.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16, attention_dropout=p, **tokens),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, attention_dropout=p),
            projection_dim=8),
        "siglip": lambda: tf.SiglipConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16, attention_dropout=p, **tokens),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, attention_dropout=p)),
        "deit_teacher": lambda: tf.DeiTConfig(image_size=16, patch_size=8, **vit),
        # image_size 24 > the 16-pixel images: the position table is interpolated, as fine-tuning at 224 on 518 does
        "dinov2": lambda: tf.Dinov2Config(image_size=24, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, mlp_ratio=2, hidden_dropout_prob=p,
                                          attention_probs_dropout_prob=p, drop_path_rate=p, num_labels=3),
        "beit": lambda: tf.BeitConfig(image_size=16, patch_size=8, use_relative_position_bias=True,
                                      layer_scale_init_value=0.1, drop_path_rate=p, **vit),
        "mobilenet_v2": lambda: tf.MobileNetV2Config(image_size=32, depth_multiplier=0.25, min_depth=8, finegrained_output=False,
                                                     classifier_dropout_prob=p, num_labels=3),
        "mobilevit": lambda: tf.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 16, 16],
                                                neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2,
                                                hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                                                classifier_dropout_prob=p, num_labels=3),
        "efficientnet": lambda: tf.EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1,
                                                      hidden_dim=128, dropout_rate=p, drop_connect_rate=p, num_labels=3),
        "regnet": lambda: tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8,
                                          num_labels=3),
        "levit": lambda: tf.LevitConfig(image_size=32, patch_size=16, hidden_sizes=[16, 16, 16], num_attention_heads=[2, 2, 2],
                                        depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=3),
        "convnextv2": lambda: tf.ConvNextV2Config(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                  patch_size=4, drop_path_rate=p, num_labels=3),
        "segformer": lambda: tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                                patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                                mlp_ratios=[2, 2], decoder_hidden_size=16, hidden_dropout_prob=p,
                                                attention_probs_dropout_prob=p, classifier_dropout_prob=p,
                                                drop_path_rate=p, num_labels=3),
        "bit": lambda: tf.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4,
                                    drop_path_rate=p, num_labels=3),
        "cvt": lambda: tf.CvtConfig(patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[8, 16],
                                    num_heads=[1, 2], depth=[1, 2], mlp_ratio=[2.0, 2.0], attention_drop_rate=[p, p],
                                    drop_rate=[p, p], drop_path_rate=[0.0, p], qkv_bias=[True, True],
                                    cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3],
                                    padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], num_labels=3),
        "poolformer": lambda: tf.PoolFormerConfig(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                                                  patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], mlp_ratio=2.0,
                                                  drop_path_rate=p, num_labels=3),
        "hubert_cls": lambda: tf.HubertConfig(num_labels=3, classifier_proj_size=8, **audio),
        "wavlm_cls": lambda: tf.WavLMConfig(num_labels=3, classifier_proj_size=8, num_buckets=16, max_bucket_distance=32,
                                            **audio),
        "ast": lambda: tf.ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    patch_size=8, frequency_stride=4, time_stride=8, max_length=32, num_mel_bins=16,
                                    hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=3),
        "speech2text": lambda: tf.Speech2TextConfig(input_feat_per_channel=8, conv_channels=16, conv_kernel_sizes=[5, 5],
                                                    max_source_positions=32, max_target_positions=16,
                                                    decoder_start_token_id=2, **seq2seq),
        "llama": lambda: tf.LlamaConfig(**causal),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **causal),  # RMSNorm of each head's q and k
        # 2 layers: a dense MLP, then 4 experts top 2 (grouped_mm), the router's softmax renormalised
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                               decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True,
                                               **dict(causal, num_hidden_layers=2)),
        "gemma3": lambda: tf.Gemma3TextConfig(
            head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            **dict(causal, num_hidden_layers=2)),
        "phi3": lambda: tf.Phi3Config(resid_pdrop=p, embd_pdrop=p, **causal),  # fused qkv_proj and gate_up_proj
        "granite": lambda: tf.GraniteConfig(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                                            attention_multiplier=0.125, **causal),
        # 2 layers: the second without rotary positions (NoPE every 2nd layer)
        "smollm3": lambda: tf.SmolLM3Config(no_rope_layer_interval=2, **dict(causal, num_hidden_layers=2)),
        # multi-head latent attention (low-rank q and kv, a rotary part of 4 dims), then a MoE layer with a
        # shared expert, 4 routed experts in 2 groups, top 2 of the best group
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
            v_head_dim=4, qk_nope_head_dim=4, **dict(causal, num_hidden_layers=2, num_key_value_heads=4)),
        # 2 layers: a global and a local one (window 4)
        "modernbert_mlm": lambda: tf.ModernBertConfig(**modernbert),
        # the head and loss on the masked tokens only, `hidden[labels != -100]` (as ModernBERT's pretraining)
        "modernbert_mlm_sparse": lambda: tf.ModernBertConfig(sparse_prediction=True, **modernbert),
        "bert_cls": lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=p,
                                          attention_probs_dropout_prob=p, num_labels=3, pad_token_id=1),
        "vit": lambda: tf.ViTConfig(image_size=16, patch_size=8, **vit),
        "olmo2": lambda: tf.Olmo2Config(**causal),  # RMSNorm after attention and MLP, of q and k whole
        "starcoder2": lambda: tf.Starcoder2Config(sliding_window=4, residual_dropout=p, embedding_dropout=p, **causal),
        "cohere": lambda: tf.CohereConfig(logit_scale=0.5, use_qk_norm=True, **causal),  # parallel block, LayerNorm
        "glm4": lambda: tf.Glm4Config(head_dim=4, **causal),  # post-norms, fused gate_up_proj, partial rotary
        # 2 layers: a short convolution (the gated conv block) and an attention layer
        "lfm2": lambda: tf.Lfm2Config(conv_L_cache=3, block_auto_adjust_ff_dim=False,
                                      layer_types=["conv", "full_attention"], **dict(causal, num_hidden_layers=2)),
        # 4 experts top 2 and a shared expert behind a sigmoid gate
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=16, **causal),
        # experts with biases and a clamped SwiGLU, attention sinks, a sliding-window layer
        "gpt_oss": lambda: tf.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                                           layer_types=["sliding_attention", "full_attention"],
                                           **dict(causal, num_hidden_layers=2)),
        "modernbert_decoder": lambda: tf.ModernBertDecoderConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, local_attention=4, layer_types=["full_attention", "sliding_attention"],
            attention_dropout=p, embedding_dropout=p, mlp_dropout=p, cls_token_id=0, sep_token_id=2, **tokens),
        # a CLIP vision tower (4 patches of 8 pixels, the CLS dropped), a 2-layer projector, a Llama
        "llava": lambda: tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, projection_dim=8,
                                              attention_dropout=p),
            text_config=tf.LlamaConfig(**causal), image_token_index=LLAVA_IMAGE_TOKEN, image_seq_length=4,
            vision_feature_layer=-1),
        # a 1-layer vision tower (patches of 4 x 4 x 2 frames, merged 2 x 2) and a Qwen2 of 3-D rotary
        # positions (mrope sections of 1, 1 and the rest)
        "qwen2_vl": lambda: tf.Qwen2VLConfig(
            text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1]),
                             **dict(causal, max_position_embeddings=64)),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=QWEN2_VL_IMAGE, video_token_id=VOCAB - 3, vision_start_token_id=QWEN2_VL_START,
            vision_end_token_id=QWEN2_VL_END),
        # the score of the last token before the padding (the reward models' head)
        "llama_cls": lambda: tf.LlamaConfig(num_labels=3, **causal),
        # SSD (the chunked state-space scan of transformers' PyTorch path), chunks of 4
        "mamba2": lambda: tf.Mamba2Config(num_heads=4, head_dim=8, vocab_size=VOCAB, hidden_size=16, state_size=4,
                                          num_hidden_layers=1, expand=2, conv_kernel=4, n_groups=1, chunk_size=4,
                                          **tokens),
        # a SigLIP vision tower (4 patches), average-pooled to 4 tokens, a Gemma3 text model
        "gemma3_vlm": lambda: tf.Gemma3Config(
            text_config=dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention"],
                             **dict(causal, num_hidden_layers=2)),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, attention_dropout=p),
            mm_tokens_per_image=4, image_token_index=LLAVA_IMAGE_TOKEN, boi_token_index=VOCAB - 2,
            eoi_token_index=VOCAB - 3),
    }[name]()


# name: (transformers class, batch, the call as its users write it)
MODELS = {
    "t5": ("T5ForConditionalGeneration", seq2seq_batch, "model(input_ids, attention_mask, labels)"),
    "bart": ("BartForConditionalGeneration", seq2seq_batch, "model(input_ids, attention_mask, labels)"),
    "distilbert": ("DistilBertForSequenceClassification", classification_batch,
                   "model(input_ids, attention_mask, labels)"),
    "roberta_mlm": ("RobertaForMaskedLM", masked_lm_batch, "model(input_ids, attention_mask, labels) (-100 off the masks)"),
    "qwen2": ("Qwen2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "mistral": ("MistralForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gpt_neox": ("GPTNeoXForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gpt2_cls": ("GPT2ForSequenceClassification", classification_batch, "model(input_ids, attention_mask, labels)"),
    "resnet": ("ResNetForImageClassification", image_batch, "model(pixel_values, labels)"),
    "convnext": ("ConvNextForImageClassification", image_batch, "model(pixel_values, labels)"),
    "swin": ("SwinForImageClassification", image_batch, "model(pixel_values, labels)"),
    "wav2vec2_ctc": ("Wav2Vec2ForCTC", ctc_batch, "model(input_values, attention_mask, labels)"),
    "wav2vec2_ctc_outside": ("Wav2Vec2ForCTC", ctc_batch, "model(input_values, attention_mask), F.ctc_loss outside"),
    "whisper": ("WhisperForConditionalGeneration", speech_batch, "model(input_features, labels)"),
    "opt": ("OPTForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "bloom": ("BloomForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "falcon": ("FalconForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "phi": ("PhiForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gemma2": ("Gemma2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gptj": ("GPTJForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "electra": ("ElectraForPreTraining", replaced_token_batch,
                "model(input_ids, attention_mask, labels) (labels 1 on replaced tokens)"),
    "albert_mlm": ("AlbertForMaskedLM", masked_lm_batch, "model(input_ids, attention_mask, labels) (-100 off the masks)"),
    "deberta_v2_cls": ("DebertaV2ForSequenceClassification", classification_batch,
                       "model(input_ids, attention_mask, labels)"),
    "deberta_v2_cls_typed": ("DebertaV2ForSequenceClassification", classification_batch,
                             "model(input_ids, attention_mask, labels), config.problem_type='single_label_classification'"),
    "xlnet": ("XLNetLMHeadModel", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "mbart": ("MBartForConditionalGeneration", seq2seq_batch, "model(input_ids, attention_mask, labels)"),
    "marian": ("MarianMTModel", seq2seq_batch, "model(input_ids, attention_mask, labels)"),
    "mamba": ("MambaForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "mixtral": ("MixtralForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "fnet_mlm": ("FNetForMaskedLM", unmasked_lm_batch, "model(input_ids, labels) (no attention mask in FNet)"),
    "squeezebert_cls": ("SqueezeBertForSequenceClassification", classification_batch,
                        "model(input_ids, attention_mask, labels)"),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "mobilebert_mlm": ("MobileBertForMaskedLM", masked_lm_batch,
                       "model(input_ids, attention_mask, labels) (-100 off the masks)"),
    "olmo": ("OlmoForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "clip": ("CLIPModel", clip_batch, "model(input_ids, attention_mask, pixel_values, return_loss=True)"),
    "siglip": ("SiglipModel", clip_batch, "model(input_ids, attention_mask, pixel_values, return_loss=True)"),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", small_image_batch,
                     "model(pixel_values), F.cross_entropy of out.logits outside (the class takes no labels)"),
    "dinov2": ("Dinov2ForImageClassification", small_image_batch, "model(pixel_values, labels)"),
    "beit": ("BeitForImageClassification", small_image_batch, "model(pixel_values, labels)"),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", image_batch, "model(pixel_values, labels)"),
    "mobilevit": ("MobileViTForImageClassification", image_batch, "model(pixel_values, labels)"),
    "efficientnet": ("EfficientNetForImageClassification", image_batch, "model(pixel_values, labels)"),
    "regnet": ("RegNetForImageClassification", image_batch, "model(pixel_values, labels)"),
    "levit": ("LevitForImageClassification", image_batch, "model(pixel_values, labels)"),
    "convnextv2": ("ConvNextV2ForImageClassification", image_batch, "model(pixel_values, labels)"),
    "segformer": ("SegformerForSemanticSegmentation", segmentation_batch, "model(pixel_values, labels) (a class mask)"),
    "bit": ("BitForImageClassification", image_batch, "model(pixel_values, labels)"),
    "cvt": ("CvtForImageClassification", image_batch, "model(pixel_values, labels)"),
    "poolformer": ("PoolFormerForImageClassification", image_batch, "model(pixel_values, labels)"),
    "hubert_cls": ("HubertForSequenceClassification", audio_classification_batch,
                   "model(input_values, attention_mask, labels)"),
    "wavlm_cls": ("WavLMForSequenceClassification", audio_classification_batch,
                  "model(input_values, attention_mask, labels)"),
    "ast": ("ASTForAudioClassification", spectrogram_batch, "model(input_values, labels)"),
    "speech2text": ("Speech2TextForConditionalGeneration", filterbank_batch, "model(input_features, labels)"),
    "llama": ("LlamaForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "qwen3": ("Qwen3ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gemma3": ("Gemma3ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "phi3": ("Phi3ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "granite": ("GraniteForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "smollm3": ("SmolLM3ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "modernbert_mlm": ("ModernBertForMaskedLM", masked_lm_batch,
                       "model(input_ids, attention_mask, labels) (-100 off the masks)"),
    "modernbert_mlm_sparse": ("ModernBertForMaskedLM", masked_lm_batch,
                              "model(input_ids, attention_mask, labels), config.sparse_prediction=True"),
    "bert_cls": ("BertForSequenceClassification", classification_batch, "model(input_ids, attention_mask, labels)"),
    "vit": ("ViTForImageClassification", small_image_batch, "model(pixel_values, labels)"),
    "olmo2": ("Olmo2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "starcoder2": ("Starcoder2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "cohere": ("CohereForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "glm4": ("Glm4ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "lfm2": ("Lfm2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gpt_oss": ("GptOssForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "modernbert_decoder": ("ModernBertDecoderForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "llava": ("LlavaForConditionalGeneration", llava_batch,
              "model(input_ids, attention_mask, pixel_values, labels) (4 image tokens first, labels -100 on them)"),
    "llama_cls": ("LlamaForSequenceClassification", classification_batch, "model(input_ids, attention_mask, labels)"),
    "mamba2": ("Mamba2ForCausalLM", causal_lm_batch, "model(input_ids, attention_mask, labels)"),
    "gemma3_vlm": ("Gemma3ForConditionalGeneration", llava_batch,
                   "model(input_ids, attention_mask, pixel_values, labels) (4 image tokens first, labels -100 on them)"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", qwen2_vl_batch,
                 "model(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels)"),
}


def build(name: str, dropout: bool = True) -> torch.nn.Module:
    import transformers
    config_name = name.removesuffix("_outside")
    return getattr(transformers, MODELS[name][0])(_config(config_name, 0.1 if dropout else 0.0))


def batch(name: str, dtype=torch.float32) -> dict:
    values = MODELS[name][1](torch.Generator().manual_seed(1))
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in values.items()}


def forward_and_loss(name: str, module, model, inputs: dict):
    """(the output, the loss) of calling `model` (`module`: the original, for its helpers) as its users do."""
    if name == "deit_teacher":  # the class takes no labels: its logits are the mean of its two heads'
        out = model(pixel_values=inputs["pixel_values"])
        return out, F.cross_entropy(out.logits, inputs["labels"])
    if name != "wav2vec2_ctc_outside":
        out = model(**inputs)
        return out, out.loss
    out = model(input_values=inputs["input_values"], attention_mask=inputs["attention_mask"])
    frames = module._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
    log_probs = F.log_softmax(out.logits, -1, dtype=torch.float32).transpose(0, 1)
    labels = inputs["labels"]
    kept = labels >= 0
    return out, F.ctc_loss(log_probs, labels.masked_select(kept), frames, kept.sum(-1), blank=0, reduction="mean",
                           zero_infinity=True)


NOT_CROSS_ENTROPY = ("clip", "siglip", "wav2vec2_ctc", "wav2vec2_ctc_outside", "segformer")  # contrastive, CTC, upsampled


BINARY_CROSS_ENTROPY = ("electra",)  # ELECTRA's replaced-token detection: a logit per token


def kfac_defaults(name: str) -> dict:
    """kfac at its defaults; for a loss that is no cross-entropy of the first output, lr 0.01 and no loss=."""
    if name in BINARY_CROSS_ENTROPY:
        return dict(loss="binary_cross_entropy")
    return dict(lr=0.01) if name in NOT_CROSS_ENTROPY else dict(loss="cross_entropy")


# transformers 5's grouped_mm experts: torch._grouped_mm has no float64 kernel, the original module raises
GROUPED_EXPERTS = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss")


def exactness(name: str, steps: int = 3) -> list[tuple[float, float, float]]:
    """Per kfac step (float64, dropout off; float32 for GROUPED_EXPERTS): the largest |difference| of the
    loss, the logits and the gradients between the compiled model and the original module at the same
    parameters."""
    torch.manual_seed(0)
    dtype = torch.float32 if name in GROUPED_EXPERTS else torch.float64
    model = build(name, dropout=False).to(dtype)
    reference, inputs = copy.deepcopy(model), batch(name, dtype)
    c = gnfx.compile(model, "kfac", **kfac_defaults(name))
    rows = []
    for _ in range(steps):
        out, loss = forward_and_loss(name, model, c, inputs)
        out_ref, loss_ref = forward_and_loss(name, reference, reference, inputs)
        loss.backward()
        loss_ref.backward()
        logits = "logits_per_image" if name in ("clip", "siglip") else "logits"
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)) -
                 (q.grad if q.grad is not None else torch.zeros_like(q))
                 for p, q in zip(model.parameters(), reference.parameters())]
        rows.append(((loss - loss_ref).abs().item(), (out[logits] - out_ref[logits]).abs().max().item(),
                     max(g.abs().max().item() for g in grads)))
        c.step()
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())  # the reference at the stepped parameters and buffers
    return rows


@dataclasses.dataclass
class Run:
    name: str
    optimizer: str
    hparams: dict
    losses: list = dataclasses.field(default_factory=list)
    error: str | None = None
    route: str | None = None
    coverage: float | None = None
    fallbacks: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)


def train(name: str, optimizer: str, steps: int, **hparams) -> Run:
    """`steps` steps of gnfx.compile(model, optimizer, **hparams) on one batch, dropout on."""
    run = Run(name, optimizer, hparams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(0)
            model = build(name)
            inputs = batch(name)
            c = gnfx.compile(model, optimizer, **hparams)
            for _ in range(steps):
                _, loss = forward_and_loss(name, model, c, inputs)
                loss.backward()
                c.step()
                c.zero_grad()
                run.losses.append(loss.item())
        except Exception as error:  # noqa: BLE001 -- what a user would see is the result
            run.error = f"{type(error).__name__}: {error}"
        try:
            covered, total = c.layers.coverage(dict(c.named_parameters()))
            run.route, run.coverage = c.layers.form, 100 * covered / total
            run.fallbacks = [(f.param, f.reason) for f in c.layers.fallbacks]
        except Exception:  # noqa: BLE001 -- not captured (the error says why)
            pass
    run.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return run


def describe(run: Run) -> str:
    losses = " ".join(f"{x:.3g}" for x in run.losses)
    lines = [f"--- {run.name} {run.optimizer} {run.hparams}: route {run.route}, "
             f"{'-' if run.coverage is None else f'{run.coverage:.1f}'}% in blocks", f"    losses: {losses}"]
    lines += [f"    error: {run.error[:600]}"] if run.error else []
    lines += [f"    fallback: {param}: {reason[:160]}" for param, reason in run.fallbacks]
    lines += [f"    warning: {w[:300]}" for w in run.warnings]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = []
    for name in args.models:
        report.append(f"===== {name}: {MODELS[name][0]}, {MODELS[name][2]}")
        try:
            report.append(f"exactness (loss, logits, gradients) per step: {exactness(name)}")
        except Exception as error:  # noqa: BLE001
            report.append(f"exactness: {type(error).__name__}: {str(error)[:600]}")
        for optimizer, hparams in [("kfac", kfac_defaults(name) if name in BINARY_CROSS_ENTROPY else
                                    dict(loss="cross_entropy")), ("shampoo", dict(lr=0.01))] + \
                ([("kfac", dict(lr=0.01))] if name in NOT_CROSS_ENTROPY else []):
            report.append(describe(train(name, optimizer, args.steps, **hparams)))
        print("\n".join(report[-4:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
