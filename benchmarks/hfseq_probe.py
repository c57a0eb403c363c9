"""First contact with transformers' state-space, recurrent, mixture-of-experts and reversible language models.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.hfseq_probe \
        [--models mamba olmoe] [--optimizers kfac adamw] [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.clip_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 4 sequences of 8 random tokens) for transformers 5's language models that
are not plain attention stacks, each from a tiny config (hidden size 16, 2 layers, a vocabulary of 48),
trained as their users train them, `model(input_ids, labels=input_ids).loss.backward()` (the labels shifted
inside, M = 4·7 = 28 loss terms):

- state-space and recurrent: `mamba` (MambaForCausalLM, the slow pure-torch path: no mamba_ssm kernels
  here), `rwkv` (RwkvForCausalLM, its WKV recurrence in torch), `recurrent_gemma` (RecurrentGemmaForCausalLM:
  a recurrent block (RG-LRU) and a local-attention block), `xlstm` (xLSTMForCausalLM, mLSTM, the native
  chunkwise kernels), the hybrids `jamba` (JambaForCausalLM: a Mamba layer, an attention layer with 4
  experts top 2), `bamba` (BambaForCausalLM: Mamba2 mixers and an attention layer) and `zamba2`
  (Zamba2ForCausalLM: Mamba2 layers and a shared attention block);
- mixture-of-experts: `olmoe` (OlmoeForCausalLM, 4 experts top 2, transformers' default `grouped_mm`
  experts), `olmoe_aux` (the same with `output_router_logits=True`: the router's load-balancing loss ×0.01
  added to out.loss), `granitemoe` (GraniteMoeForCausalLM, its experts as a 3-D parameter in a grouped
  product), `mixtral_batched` and `gpt_oss_batched` (`experts_implementation="batched_mm"`: `W[expert_ids]`
  in `torch.bmm`, gpt-oss's stored (E, d_in, d_out) with biases), `mixtral_eager`
  (`experts_implementation="eager"`: a Python loop over the experts hit, `F.linear(x[token_idx],
  W[expert_idx])`), `switch` (SwitchTransformersForConditionalGeneration: experts an nn.ModuleDict of dense
  MLPs called on the tokens routed to them, encoder-decoder, `model(input_ids, labels)` with 5 labels);
- reversible: `reformer` (ReformerModelWithLMHead, a local and an LSH attention layer, axial positions,
  reversible residual layers whose backward recomputes the forward in a custom autograd.Function),
  `reformer_nocache` (the same called with `use_cache=False`).

Optimizers: "kfac" at its defaults with loss="cross_entropy" (the quadratic step, fisher="mc"), "kfac_lr"
(lr 1e-3, with exactness), "shampoo" at lr 1e-3, and torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the
capture's form, the share of the trainable parameters in curvature blocks, exactness (the kfac_lr rows:
float64 (float32 for GROUPED: torch's grouped product has no float64 kernel), dropout off, the compiled model
beside a copy over 3 steps: the largest |difference| of the loss and of any gradient; and K-FAC's A and S of
every nn.Linear block after one step at stat_decay 0, fisher="empirical", against plain hooks on the copy:
relative max gaps (and the blocks that have no statistics after the step), with S's row count
M = trace(S) / trace(Σ g gᵀ) per block (28, or 20 for Switch's
decoder-side loss: every block should show the loss's terms, experts that see a few tokens too), the
losses, gnfx's warnings (once each), the parameters outside the blocks, the seconds; or the error. transformers
is the venv's (5.24), no dependency of gnfx. The results: benchmarks/results/first_contact_12_hfseq.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import gnfx
from benchmarks.child_rows import probe_main, problem_row
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import lockstep_gaps

VOCAB, BATCH, TOKENS, LABELS = 48, 4, 8, 5
GROUPED = ("olmoe", "olmoe_aux", "granitemoe", "jamba")  # transformers' grouped_mm experts: float32 only
OPTIMIZERS = {"kfac": ("kfac", {"loss": "cross_entropy"}), "kfac_lr": ("kfac", {"lr": 1e-3}),
              "shampoo": ("shampoo", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}


def _config(name: str, dropout: float):
    import transformers as tf
    tokens = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    causal = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, attention_dropout=dropout, **tokens)
    mamba = dict(mamba_d_state=4, mamba_d_conv=4, mamba_expand=2)
    moe = dict(num_experts_per_tok=2, **causal)
    configs = {
        "mamba": lambda: tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                        conv_kernel=4, time_step_rank=4, **tokens),
        "rwkv": lambda: tf.RwkvConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
                                      intermediate_size=32, context_length=32, **tokens),
        "recurrent_gemma": lambda: tf.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, lru_width=16, attention_window_size=4, conv1d_width=4,
            block_types=["recurrent", "attention"], partial_rotary_factor=0.5, attention_dropout=dropout, **tokens),
        "xlstm": lambda: tf.xLSTMConfig(
            vocab_size=VOCAB, hidden_size=16, embedding_dim=16, num_hidden_layers=2, num_heads=2, qk_dim_factor=0.5,
            v_dim_factor=1.0, chunk_size=4, mode="train", chunkwise_kernel="chunkwise--native_autograd",
            sequence_kernel="native_sequence__native", step_kernel="native", use_cache=False, **tokens),
        "jamba": lambda: tf.JambaConfig(num_experts=4, expert_layer_period=2, expert_layer_offset=1,
                                        attn_layer_period=2, attn_layer_offset=1, mamba_dt_rank=4, **mamba, **moe),
        "bamba": lambda: tf.BambaConfig(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
                                        mamba_chunk_size=4, **mamba, **causal),
        "zamba2": lambda: tf.Zamba2Config(
            mamba_ngroups=1, mamba_headdim=8, n_mamba_heads=4, chunk_size=4,
            layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], num_mem_blocks=1, **mamba,
            **dict(causal, num_key_value_heads=4)),
        "olmoe": lambda: tf.OlmoeConfig(num_experts=4, **moe),
        "olmoe_aux": lambda: tf.OlmoeConfig(num_experts=4, output_router_logits=True, router_aux_loss_coef=0.01, **moe),
        "granitemoe": lambda: tf.GraniteMoeConfig(num_local_experts=4, **moe),
        "mixtral_batched": lambda: tf.MixtralConfig(num_local_experts=4, experts_implementation="batched_mm", **moe),
        "gpt_oss_batched": lambda: tf.GptOssConfig(
            num_local_experts=4, experts_implementation="batched_mm", head_dim=4, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], **moe),
        "mixtral_eager": lambda: tf.MixtralConfig(num_local_experts=4, experts_implementation="eager", **moe),
        "switch": lambda: tf.SwitchTransformersConfig(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, expert_capacity=64, num_layers=2, num_sparse_encoder_layers=1,
            num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=2, num_experts=4,
            relative_attention_num_buckets=8, dropout_rate=dropout, decoder_start_token_id=0, **tokens),
        "reformer": lambda: tf.ReformerConfig(
            vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32,
            attn_layers=["local", "lsh"], axial_pos_embds=True, axial_pos_shape=[2, 4], axial_pos_embds_dim=[8, 8],
            local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2, num_hashes=1, is_decoder=True,
            max_position_embeddings=TOKENS, hidden_dropout_prob=dropout, local_attention_probs_dropout_prob=dropout,
            lsh_attention_probs_dropout_prob=0.0, pad_token_id=1, eos_token_id=2),
    }
    return configs[name.removesuffix("_nocache")]()


CLASSES = {"mamba": "MambaForCausalLM", "rwkv": "RwkvForCausalLM", "recurrent_gemma": "RecurrentGemmaForCausalLM",
           "xlstm": "xLSTMForCausalLM", "jamba": "JambaForCausalLM", "bamba": "BambaForCausalLM",
           "zamba2": "Zamba2ForCausalLM", "olmoe": "OlmoeForCausalLM", "olmoe_aux": "OlmoeForCausalLM",
           "granitemoe": "GraniteMoeForCausalLM", "mixtral_batched": "MixtralForCausalLM",
           "gpt_oss_batched": "GptOssForCausalLM", "mixtral_eager": "MixtralForCausalLM",
           "switch": "SwitchTransformersForConditionalGeneration", "reformer": "ReformerModelWithLMHead",
           "reformer_nocache": "ReformerModelWithLMHead"}
MODELS = tuple(CLASSES)


def build(name: str, dropout: float = 0.1) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    import transformers
    return getattr(transformers, CLASSES[name])(_config(name, dropout))


def problem(name: str):
    """(batch, loss(model, batch)): the users' call, `model(**batch).loss`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if name == "switch":
        batch["labels"] = torch.randint(3, VOCAB, (BATCH, LABELS), generator=g)
    if name == "reformer_nocache":
        batch["use_cache"] = False
    return batch, lambda m, b: m(**b).loss


def loss_terms(name: str) -> int:
    """M: the terms of the users' mean cross-entropy (the causal LMs shift their labels by one)."""
    return BATCH * LABELS if name == "switch" else BATCH * (TOKENS - 1)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ (M ...)': module doc."""
    dtype = torch.float32 if name in GROUPED else torch.float64
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = build(name, dropout=0.0).to(dtype).train()
        reference = copy.deepcopy(model)
        batch, loss_of = problem(name)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m, batch), 3, seed=100)
        torch.manual_seed(0)
        model = build(name, dropout=0.0).to(dtype).train()
        reference = copy.deepcopy(model)
        c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0, fisher="empirical")
        torch.manual_seed(7)
        loss_of(c, batch).backward()
        modules = dict(reference.named_modules())
        linear = [b.name for b in c.layers.blocks if isinstance(modules.get(b.name), nn.Linear)]
        torch.manual_seed(7)
        with hooked_calls(reference, linear) as calls:
            loss_of(reference, batch).backward()
        c.step()
        a_gap = s_gap = 0.0
        rows, unstated = {}, []
        for n in linear:
            if not any(g is not None for _, g in calls[n]):
                continue
            A, gg = linear_factors(calls[n], modules[n].bias is not None)
            try:
                stats = c.statistics(n)
            except gnfx.errors.StatisticsError:  # (a block whose statistics the step did not get)
                unstated.append(n)
                continue
            a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
            M = (stats["S"].trace() / gg.trace()).item()  # gnfx's S = M Σ g gᵀ: its row count M
            rows.setdefault(f"{M:.4g}", []).append(n)
            s_gap = max(s_gap, ((stats["S"] - M * gg).abs().max() / stats["S"].abs().max()).item())
        expected = loss_terms(name)
        wrong = {m: ns for m, ns in rows.items() if abs(float(m) - expected) > 1e-6 * expected}
        said = f"M {expected} in all {sum(map(len, rows.values()))} Linear" if not wrong else \
            "M " + "; ".join(f"{m} at {', '.join(ns[:3])}" for m, ns in rows.items())
        missing = f"; no statistics in {len(unstated)} Linear blocks the hooks saw, as {unstated[0]}" if unstated else ""
        return (f"{loss_gap:.0e}, {grad_gap:.0e}; A {a_gap:.0e}, S {s_gap:.0e} ({said}"
                f"{', float32' if dtype == torch.float32 else ''}{missing})")
    finally:
        torch.set_default_dtype(torch.float32)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]
    return problem_row(name, optimizer, kind, hparams, steps, build, problem, exactness)


def main() -> None:
    probe_main(__doc__, "benchmarks.hfseq_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad; A, S (float64) | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
