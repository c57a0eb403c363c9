"""First contact with litgpt (Lightning AI's LLM library), called as its users call it.

    PYTHONPATH=<litgpt>:. OMP_NUM_THREADS=1 python -m benchmarks.llm_probe \
        [--models pythia llama] [--optimizers kfac adamw] [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 4 sequences of 16 random token ids from a vocabulary of 128) for litgpt's
`GPT` from tiny configs (2 layers, width 64, 4 heads, `model.max_seq_length = 16` as litgpt's loops set it):

- `pythia`: `Config.from_name("pythia-14m", ...)` (LayerNorm, parallel residual, a fused qkv Linear with
  rotary embedding on a quarter of each head, GptNeoxMLP, an untied lm_head);
- `llama`: a Llama-style `Config` (RMSNorm, sequential residual, grouped-query attention with 2 query
  groups, full rotary embedding, LLaMAMLP's SwiGLU, no biases);
- `gemma2`: `Config.from_name("gemma-2-2b", ...)` (heads of 16, 2 query groups, MLP width 128; scaled embeddings, GemmaMLP, attention and final logit
  soft-capping, post-attention and post-MLP norms, a sliding window on every other layer);

each trained as litgpt's pretrain loop does: `logits = model(input_ids)`,
`litgpt.utils.chunked_cross_entropy(logits, targets)`; and the parameter-efficient fine-tuning variants of
the `llama` config, trained as litgpt's finetune loops do, `logits = model(input_ids,
lm_head_chunk_size=8)` (the lm_head's output as a list of chunks along the sequence, litgpt's 128 scaled to
these sequences), `logits[-1] = logits[-1][..., :-1, :]`, `chunked_cross_entropy(logits, targets[..., 1:])`
with the targets of the first 5 tokens (the prompt) at ignore_index -100:

- `lora`: `litgpt.lora.GPT` (r 4, α 8, on query, value, projection, MLP and head) after
  `mark_only_lora_as_trainable`;
- `adapter`: `litgpt.adapter.GPT` (LLaMA-Adapter: a prefix of 4 learned tokens in the last layer's attention,
  gated) after `mark_only_adapter_as_trainable`;
- `adapter_v2`: `litgpt.adapter_v2.GPT` (the adapter and each Linear's bias and scale) after
  `mark_only_adapter_v2_as_trainable`;
- `lora_whole`: `lora` trained on the whole logits, `chunked_cross_entropy(model(input_ids)[..., :-1, :],
  targets[..., 1:], chunk_size=0)` (litgpt's validate loss): what a kfac user can do instead of the chunks.

litgpt 0.5.13's adapters keep their prefix's keys and values (`adapter_kv_cache`, meant for inference) from the
first forward, with its graph, so that the second backward raises under torch.optim.AdamW too: the probe
clears them before each forward.

Optimizers: "kfac" at its defaults with loss="cross_entropy" (the logits are the output; on the fine-tuning
variants, a list of chunks), "kfac_chunks" (the fine-tuning variants: one cross-entropy per chunk, weighted by
its share of the rows, 8/15 and 7/15, loss= a tuple as gnfx's error asks), "kfac_lr" (lr 1e-3), "shampoo", "diag" and "auto" at lr 1e-3, and for reference
torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the share of the trainable parameters in
curvature blocks, exactness (the kfac_lr runs, float64: the compiled model beside a second build from the same
seed over 3 steps, benchmarks.lockstep, the largest |difference| of the loss and of any gradient; and the first
step's K-FAC A and S of every nn.Linear block against forward and gradient hooks on every call,
benchmarks.hooked_calls, A = mean over the calls' rows of ā āᵀ, S = M Σ g gᵀ with M the tokens the loss
averages (B·T, or the unmasked ones), largest gap relative to the largest entry), the losses, gnfx's warnings
(once each) and the parameters outside the blocks, the seconds; or the error. litgpt is not a dependency of
gnfx. The results: benchmarks/results/first_contact_11_llm.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import gnfx
from benchmarks.child_rows import one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import float64_gaps

BATCH, TOKENS, VOCAB, PROMPT, CHUNK = 4, 16, 128, 5, 8
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 32, "vocab_size": VOCAB, "padded_vocab_size": VOCAB}
LLAMA = {**TINY, "name": "tiny-llama", "n_query_groups": 2, "rotary_percentage": 1.0, "parallel_residual": False,
         "bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "intermediate_size": 128}
PRETRAINED = {"pythia": ("pythia-14m", {}),  # Config.from_name with TINY and these
              "gemma2": ("gemma-2-2b", {"head_size": 16, "n_query_groups": 2, "intermediate_size": 128})}
PEFT = {"lora": {"lora_r": 4, "lora_alpha": 8, "lora_query": True, "lora_value": True, "lora_projection": True,
                 "lora_mlp": True, "lora_head": True},
        "adapter": {"adapter_prompt_length": 4, "adapter_start_layer": 1},
        "adapter_v2": {"adapter_prompt_length": 4, "adapter_start_layer": 1}}
WHOLE = "lora_whole"  # lora trained on the whole logits, as litgpt's validate computes its loss
MODELS = (*PRETRAINED, "llama", *PEFT, WHOLE)
CHUNKS = (("cross_entropy", CHUNK / (TOKENS - 1)), ("cross_entropy", (TOKENS - 1 - CHUNK) / (TOKENS - 1)))
OPTIMIZERS = {"kfac": ("kfac", {"loss": "cross_entropy"}), "kfac_chunks": ("kfac", {"loss": CHUNKS}),
              "kfac_lr": ("kfac", {"lr": 1e-3}),
              "shampoo": ("shampoo", {"lr": 1e-3}), "diag": ("diag", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _litgpt():
    try:
        import litgpt
        import litgpt.adapter
        import litgpt.adapter_v2
        import litgpt.lora
        import litgpt.utils
    except ImportError as exc:
        raise SystemExit(f"benchmarks.llm_probe needs litgpt ({exc}): unpack its wheel without dependencies and "
                         f"put it on PYTHONPATH (module docstring)") from exc
    return litgpt


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed, its trainable parameters
    marked as litgpt's loops mark them and its max_seq_length set."""
    litgpt = _litgpt()
    if name in PRETRAINED:
        config, more = PRETRAINED[name]
        model = litgpt.GPT(litgpt.Config.from_name(config, **TINY, **more))
    elif name == "llama":
        model = litgpt.GPT(litgpt.Config(**LLAMA))
    else:
        name = "lora" if name == WHOLE else name
        variant = getattr(litgpt, name)
        model = variant.GPT(variant.Config(**LLAMA, **PEFT[name]))
        {"lora": litgpt.lora.mark_only_lora_as_trainable, "adapter": litgpt.adapter.mark_only_adapter_as_trainable,
         "adapter_v2": litgpt.adapter_v2.mark_only_adapter_v2_as_trainable}[name](model)
    model.max_seq_length = TOKENS
    return model


def problem(name: str):
    """(batch, loss(compiled or plain model, batch), M the tokens the loss averages) of `name` as litgpt's
    pretrain or finetune loop trains it (module doc)."""
    chunked_cross_entropy = _litgpt().utils.chunked_cross_entropy
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, TOKENS + 1), generator=g)
    if name not in (*PEFT, WHOLE):
        batch = tokens[:, :-1], tokens[:, 1:]
        return batch, lambda m, b: chunked_cross_entropy(m(b[0]), b[1]), BATCH * TOKENS
    input_ids = tokens[:, :-1]
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100

    def finetune_loss(m, b):
        for module in m.modules():  # litgpt's adapter keeps its prefix's keys and values, and their graph
            if getattr(module, "adapter_kv_cache", None) is not None:
                module.adapter_kv_cache = None
        if name == WHOLE:
            return chunked_cross_entropy(m(b[0])[..., :-1, :], b[1][..., 1:], chunk_size=0)
        logits = m(b[0], lm_head_chunk_size=CHUNK)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, b[1][..., 1:])
    return (input_ids, labels), finetune_loss, int(labels[..., 1:].ne(-100).sum())


def factor_gaps(name: str, hparams: dict) -> str:
    """The largest gap of the first step's A and S of the nn.Linear blocks against hooks, relative to the
    largest entry (module doc), float64."""
    torch.manual_seed(0)
    model = build(name).double()
    reference = copy.deepcopy(model)
    batch, loss_of, m = problem(name)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if type(mod) is nn.Linear and mod.weight.requires_grad]
    with hooked_calls(reference, linears) as calls:
        loss_of(reference, batch).backward()
    loss_of(c, batch).backward()
    c.step()
    return linear_factor_gap(c, calls, m)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ': the compiled float64 model beside a second build from the same seed, over 3
    steps; the first step's factors against hooks (`factor_gaps`)."""
    def loss_for(_):
        batch, loss_of, _ = problem(name)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]

    def made():
        model = build(name).train()
        batch, loss_of, _ = problem(name)
        return model, lambda c: loss_of(c, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.llm_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300,  # kfac_chunks, by default, for the models whose output is a list of chunks
               chosen=lambda name, optimizer, given: given or (optimizer != "kfac_chunks" or name in PEFT) and (
                   name != WHOLE or optimizer in ("kfac", "adamw")))


if __name__ == "__main__":
    main()
