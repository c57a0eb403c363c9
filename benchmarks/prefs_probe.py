"""First contact with preference and fine-tuning losses as Hugging Face trl's users train language models.

    PYTHONPATH=<trl>:<datasets, pyarrow, dill, multiprocess, xxhash>:<pandas>:<peft>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.prefs_probe [--models dpo dpo_peft] [--optimizers kfac adamw] [--steps 4] \
        [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch) on a tiny random LlamaForCausalLM (transformers 5; vocabulary 64, width 32, 2
layers, 4 heads, 2 key-value heads), with 4 prompts of 6 tokens and completions of 6 tokens:

- `dpo`: DPO as trl's DPOTrainer computes it (trl 1.16 `_compute_loss`, loss_type "sigmoid", β 0.1), written by
  hand on the logits: one forward of the chosen and rejected sequences concatenated (the batch is [chosen,
  rejected]), each completion's log-probability Σ_t log softmax(z_t)[y_{t+1}] over its tokens (labels -100 on
  the prompt), the reference model a frozen copy made before gnfx.compile, called under torch.no_grad, and
  `-logsigmoid(β((π_c - ref_c) - (π_r - ref_r))).mean()`;
- `dpo_peft`: the same on a peft LoRA model (r 4 on q_proj and v_proj), the reference the same model with its
  adapters disabled (`with peft_model.disable_adapter(), torch.no_grad():`, trl's `use_adapter(model, None)`),
  the forward called on the compiled model; `dpo_peft_grad`: the same with the reference forward run with
  gradients enabled and its log-probabilities detached, as a hand-written loop may, and the adapters
  initialized at random (`init_lora_weights=False`: the policy is not the reference at the first step, a
  statistic step);
- `dpo_fused`: trl 1.16's own path: `trl.trainer.utils.add_fused_lm_head(model)` patches the forward so that
  `model(input_ids, labels=labels, fused_lm_head=True).log_probs` returns the per-token log-probabilities (its
  `_ChunkedLogProbFunction`, a torch.autograd.Function over the hidden states and the lm_head weight; no
  logits), then DPO's loss as in `dpo`;
- `reward`: reward modelling as trl's RewardTrainer computes it: LlamaForSequenceClassification(num_labels=1)
  on [chosen, rejected], `-logsigmoid(r_chosen - r_rejected).mean()`;
- `sft`: SFT with the completion-only loss (trl's `completion_only_loss`): labels -100 on the prompt,
  `model(input_ids, labels=labels).loss`; `sft_packed`: two examples packed per row (trl's packing), the
  position ids restarting at each example and labels -100 on each prompt;
- `kto`: KTO as trl's KTOTrainer computes it (loss_type "kto"): desirable completions `1 - σ(β(r - KL))`,
  undesirable ones `1 - σ(β(KL - r))`, r the log-ratio to the reference copy, KL the detached mean log-ratio
  of mismatched completions (each prompt with another prompt's completion), clamped at 0;
- `orpo`: ORPO as trl's ORPOTrainer computes it: the chosen completions' mean negative log-likelihood minus
  λ·mean logsigmoid(log odds ratio) of the average per-token log-probabilities, no reference model.

Optimizers: "kfac" at its defaults (loss="cross_entropy" for the SFT losses, which gnfx models; none for the
others: its default lr), "kfac_ce" (the preference losses with loss="cross_entropy" and no lr, the quadratic
step: what gnfx does with a loss that is not the cross-entropy of the logits), "kfac_lr" (lr 1e-3, the
empirical Fisher), "shampoo" and "auto" at lr 1e-3, and torch.optim.AdamW at lr 1e-3 ("adamw", the reference).
Per run: the capture's form, the share of the trainable parameters in curvature blocks, exactness (kfac_lr
rows, float64: benchmarks.lockstep.float64_gaps, loss and gradient gaps over 3 steps against a second build;
and the first step's K-FAC A and S of every nn.Linear block the loss reaches against plain hooks on every call,
benchmarks.hooked_calls: A's largest relative gap, and m, the factor by which gnfx's S is the hooks' Σ g gᵀ,
fitted over the blocks, with the fit's largest relative gap, beside the rows of the output the loss reaches),
the losses, gnfx's warnings and the parameters outside the blocks, the seconds; or the error. trl, peft and
datasets are not dependencies of gnfx. The results: benchmarks/results/first_contact_13_prefs.md.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import float64_gaps

VOCAB, PAIRS, PROMPT, COMPLETION, BETA = 64, 4, 6, 6, 0.1
MODELS = ("dpo", "dpo_peft", "dpo_peft_grad", "dpo_fused", "reward", "sft", "sft_packed", "kto", "orpo")
PREFERENCE = ("dpo", "dpo_peft", "dpo_peft_grad", "dpo_fused", "reward", "kto", "orpo")
LOSS = {"sft": "cross_entropy", "sft_packed": "cross_entropy"}  # kfac's loss= at its defaults
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_ce": ("kfac", {"loss": "cross_entropy"}),
              "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "auto": ("auto", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    if name == "reward":
        return LlamaForSequenceClassification(config.__class__(**config.to_dict(), num_labels=1))
    model = LlamaForCausalLM(config)
    if name in ("dpo_peft", "dpo_peft_grad"):
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=name == "dpo_peft"))
    if name == "dpo_fused":
        from trl.trainer.utils import add_fused_lm_head
        add_fused_lm_head(model)
    return model


def pairs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] token ids (2·PAIRS, PROMPT + COMPLETION) on shared prompts, and their labels (-100 on the
    prompt), as trl's DPO collator concatenates them."""
    prompt = torch.randint(1, VOCAB, (PAIRS, PROMPT), generator=g).repeat(2, 1)
    ids = torch.cat([prompt, torch.randint(1, VOCAB, (2 * PAIRS, COMPLETION), generator=g)], 1)
    return ids, ids.masked_fill(torch.arange(ids.shape[1]) < PROMPT, -100)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Σ (or mean: ORPO's average_log_prob) over the completion's tokens of log softmax(z_t)[y_{t+1}]."""
    targets, logits = labels[:, 1:], logits[:, :-1]
    mask = targets != -100
    per_token = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
    return per_token.sum(1) / mask.sum(1) if average else per_token.sum(1)


def problem(name: str, model: nn.Module):
    """(batch, loss(compiled or plain model, batch)) of `name` as trl computes it (module doc); the reference
    models are copies of `model` made now, before gnfx.compile."""
    g = torch.Generator().manual_seed(1)
    ids, labels = pairs(g)
    if name in ("sft", "sft_packed"):
        if name == "sft":
            return (ids, labels), lambda m, b: m(input_ids=b[0], labels=b[1]).loss
        # two examples per row: positions restart at each, the prompts' labels -100
        position_ids = torch.arange(ids.shape[1]).repeat(PAIRS, 2)
        return ((ids.reshape(PAIRS, -1), labels.reshape(PAIRS, -1), position_ids),
                lambda m, b: m(input_ids=b[0], labels=b[1], position_ids=b[2]).loss)
    if name == "reward":
        return ids, lambda m, b: -F.logsigmoid(torch.sub(*m(input_ids=b).logits.squeeze(-1).chunk(2))).mean()
    if name == "orpo":
        def orpo(m, b):
            logits = m(input_ids=b[0]).logits
            chosen, rejected = completion_logps(logits, b[1], average=True).chunk(2)
            nll = F.cross_entropy(logits[:PAIRS, :-1].flatten(0, 1), b[1][:PAIRS, 1:].flatten(), ignore_index=-100)
            log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
            return nll - BETA * F.logsigmoid(log_odds).mean()
        return (ids, labels), orpo
    if name == "dpo_fused":
        reference = copy.deepcopy(model).requires_grad_(False)
        def logps_of(m, b):
            return m(input_ids=b[0], labels=b[1], fused_lm_head=True).log_probs.sum(1)
    elif name in ("dpo_peft", "dpo_peft_grad"):
        import peft

        def reference(input_ids):  # the model last called, with the adapters of the peft model it runs disabled
            called = model_called[0]
            with (called if isinstance(called, peft.PeftModel) else model).disable_adapter():
                return called(input_ids=input_ids)
        model_called = [model]

        def logps_of(m, b):
            model_called[0] = m
            return completion_logps(m(input_ids=b[0]).logits, b[1])
    else:
        reference = copy.deepcopy(model).requires_grad_(False)

        def logps_of(m, b):
            return completion_logps(m(input_ids=b[0]).logits, b[1])
    if name == "kto":  # the first PAIRS completions desirable, the others undesirable; KL on mismatched ones
        mismatched = torch.cat([ids[:, :PROMPT], ids.roll(1, 0)[:, PROMPT:]], 1), labels.roll(1, 0)

        def kto(m, b):
            policy = logps_of(m, b)
            with torch.no_grad():
                ref = completion_logps(reference(input_ids=b[0]).logits, b[1])
                kl = (logps_of(m, mismatched) - completion_logps(reference(input_ids=mismatched[0]).logits,
                                                                 mismatched[1])).mean().clamp(min=0)
            ratio = policy - ref
            return torch.cat([1 - torch.sigmoid(BETA * (ratio[:PAIRS] - kl)),
                              1 - torch.sigmoid(BETA * (kl - ratio[PAIRS:]))]).mean()
        return (ids, labels), kto

    def dpo(m, b):
        policy = logps_of(m, b)
        with torch.no_grad() if name != "dpo_peft_grad" else contextlib.nullcontext():
            if name == "dpo_fused":
                ref = logps_of(reference, b)
            else:
                ref = completion_logps(reference(input_ids=b[0]).logits, b[1]).detach()
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
    return (ids, labels), dpo


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    if name == "dpo_fused" and kind != "adamw":  # its Function reads lm_head.weight: the fix gnfx's error names
        hparams = {**hparams, "leaf_modules": ["lm_head"]}
    return kind, hparams


def factor_gaps(name: str) -> str:
    """The first step's A and S of the reached nn.Linear blocks against hooks (module doc), in the current dtype."""
    torch.manual_seed(0)
    model = build(name).to(torch.get_default_dtype())
    torch.manual_seed(0)
    reference = build(name).to(torch.get_default_dtype())
    batch, loss_of = problem(name, model)
    _, reference_loss_of = problem(name, reference)
    c = gnfx.compile(model, "kfac", **settings(name, "kfac_lr")[1], stat_decay=0.0, stat_every=1)
    linears = [n for n, mod in reference.named_modules() if type(mod) is nn.Linear]
    with hooked_calls(reference, linears) as calls:
        torch.manual_seed(7)
        reference_loss_of(reference, batch).backward()
    torch.manual_seed(7)
    loss_of(c, batch).backward()
    c.step()
    pairs_, a_gap = [], 0.0
    for block in [b.name for b in c.layers if any(g is not None for _, g in calls.get(b.name, []))]:
        A, gg = linear_factors(calls[block], c.layers[block].bias is not None)
        stats = c.statistics(block)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
        pairs_.append((stats["S"], gg))
    if not pairs_:
        return "no linear block"
    m = sum((s * gg).sum() for s, gg in pairs_) / sum((gg * gg).sum() for _, gg in pairs_)
    s_gap = max(((s - m * gg).abs().max() / s.abs().max()).item() for s, gg in pairs_)
    rows = int((batch[1][:, 1:] != -100).sum()) if isinstance(batch, tuple) else batch.shape[0]
    return f"{len(pairs_)} linear: A {a_gap:.0e}; S = {m.item():.4g} Σggᵀ ({s_gap:.0e}); rows reached {rows}"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; hooks': float64, the compiled model beside a second build from the same seed."""
    def loss_for(model):
        batch, loss_of = problem(name, model)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name))


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name).train()
        batch, loss_of = problem(name, model)
        return model, lambda c: loss_of(c, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.prefs_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300,
               # kfac_ce, by default, for the preference losses only
               chosen=lambda name, optimizer, given: optimizer != "kfac_ce" or given or name in PREFERENCE)


if __name__ == "__main__":
    main()
