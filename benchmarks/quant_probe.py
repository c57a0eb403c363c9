"""First contact with compression-aware training: torch.nn.utils.prune, brevitas, torchao QAT, bitsandbytes QLoRA.

    PYTHONPATH=<brevitas, torchao, bitsandbytes>:<dependencies==2.0.1, unfoldNd>:<peft>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.quant_probe [--models prune_mlp brevitas_lenet] [--optimizers kfac adamw] \
        [--steps 6] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch of 32, cross-entropy over 10 classes) for:

- `prune_mlp`: an MLP 64-128-64-10 pruned as PyTorch's pruning tutorial does before fine-tuning:
  `prune.l1_unstructured(fc1, "weight", 0.5)`, `prune.ln_structured(fc2, "weight", 0.3, n=2, dim=0)`, then
  `prune.global_unstructured` over the three weights (20% more); each weight is `weight_mask * weight_orig`,
  set by a forward pre-hook;
- `prune_cnn`: a LeNet (two Conv2d, two Linear, 16x16 inputs) whose four weights `prune.global_unstructured`
  prunes by 60% at once (the lottery-ticket setup);
- `prune_transformer`: nn.TransformerEncoder (width 32, 2 layers, 4 heads, batch-first, on 8 tokens of 64
  features, mean-pooled into a linear head) whose nn.Linear weights (not the attention's out_proj, which it never
  calls, so its hook would never run) and nn.MultiheadAttention `in_proj_weight`s `prune.global_unstructured`
  prunes by 50%;
- `brevitas_lenet`: brevitas' README QuantLeNet at 16x16 (QuantIdentity 4 bit into QuantConv2d with 3-bit
  weights, QuantReLU returning QuantTensors, F.max_pool2d and reshape of QuantTensors, QuantLinear): weights
  and activations fake-quantized by custom autograd Functions with straight-through estimators, scales
  learned (ParameterFromRuntimeStatsScaling);
- `torchao_qat`: an MLP 64-128-10 prepared by `torchao.quantization.quantize_(model, QATConfig(activation_config=
  IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), weight_config=IntxFakeQuantizeConfig(
  torch.int4, group_size=32), step="prepare"))`: each nn.Linear becomes a FakeQuantizedLinear;
- `bnb_qlora`: the same MLP with its first layer a frozen bitsandbytes `Linear4bit` (NF4, float32 compute, on the
  CPU), then peft's `get_peft_model(model, LoraConfig(r=8, target_modules=["fc1", "fc2"]))`: the LoRA factors train.

Optimizers: "kfac" at its defaults (loss="cross_entropy": the quadratic step, which needs forward-mode
derivatives through every custom Function), "kfac_lr" (lr 1e-3, the exactness row), "shampoo" at lr 1e-3, and
for reference torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the share of the trainable
parameters in curvature blocks, exactness (the kfac_lr runs, float64, float32 for torchao and bitsandbytes, which
refuse float64: the compiled model beside a second build from the same seed over 3 steps, the largest |difference|
of the loss and of any gradient; then the first
statistic step's K-FAC A and S of every nn.Linear block against plain hooks, benchmarks.hooked_calls), the
losses, gnfx's warnings and the parameters outside the blocks, the seconds; or the error. None of these
libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_13_quant.md.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import gnfx
from benchmarks.child_rows import library, probe_main, problem_row
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import float64_gaps, lockstep_gaps

BATCH, CLASSES = 32, 10
MODELS = ("prune_mlp", "prune_cnn", "prune_transformer", "brevitas_lenet", "torchao_qat", "bnb_qlora")
# torchao's fake quantization ("Unsupported input dtype: torch.float64") and bitsandbytes' 4-bit blocks ("only
# supports 16/32-bit floats") refuse float64: their exactness runs in float32
FLOAT32_ONLY = ("torchao_qat", "bnb_qlora")
OPTIMIZERS = {"kfac": ("kfac", {"loss": "cross_entropy"}), "kfac_lr": ("kfac", {"lr": 1e-3}),
              "shampoo": ("shampoo", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's


def _import(name: str):
    return library("benchmarks.quant_probe", name)


class MLP(nn.Module):
    def __init__(self, hidden=(128,)):
        super().__init__()
        widths = (64, *hidden, CLASSES)
        self.fc1, *rest = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
        self.rest = nn.ModuleList(rest)

    def forward(self, x):
        x = self.fc1(x)
        for layer in self.rest:
            x = layer(F.relu(x))
        return x


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 16, 3)
        self.fc1, self.fc2 = nn.Linear(16 * 2 * 2, 32), nn.Linear(32, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _quant_lenet() -> nn.Module:
    qnn = _import("brevitas.nn")

    class QuantLeNet(nn.Module):  # brevitas' README, at 16x16
        def __init__(self):
            super().__init__()
            self.quant_inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
            self.conv1 = qnn.QuantConv2d(3, 6, 3, weight_bit_width=3)
            self.relu1 = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
            self.conv2 = qnn.QuantConv2d(6, 16, 3, weight_bit_width=3)
            self.relu2 = qnn.QuantReLU(bit_width=3, return_quant_tensor=True)
            self.fc1 = qnn.QuantLinear(16 * 2 * 2, 32, bias=True, weight_bit_width=3)
            self.relu3 = qnn.QuantReLU(bit_width=3, return_quant_tensor=True)
            self.fc2 = qnn.QuantLinear(32, CLASSES, bias=False, weight_bit_width=3)

        def forward(self, x):
            out = F.max_pool2d(self.relu1(self.conv1(self.quant_inp(x))), 2)
            out = F.max_pool2d(self.relu2(self.conv2(out)), 2)
            return self.fc2(self.relu3(self.fc1(out.reshape(out.shape[0], -1))))
    return QuantLeNet()


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "prune_mlp":
        model = MLP((128, 64))
        prune.l1_unstructured(model.fc1, "weight", amount=0.5)
        prune.ln_structured(model.rest[0], "weight", amount=0.3, n=2, dim=0)
        prune.global_unstructured([(model.fc1, "weight"), (model.rest[0], "weight"), (model.rest[1], "weight")],
                                  prune.L1Unstructured, amount=0.2)
        return model
    if name == "prune_cnn":
        model = LeNet()
        prune.global_unstructured([(m, "weight") for m in (model.conv1, model.conv2, model.fc1, model.fc2)],
                                  prune.L1Unstructured, amount=0.6)
        return model
    if name == "prune_transformer":
        model = Transformer()
        # (not MultiheadAttention's out_proj, whose weight the attention reads without calling it: its hook would
        # never run, in eager PyTorch either)
        pruned = [(m, "weight") for m in model.modules() if type(m) is nn.Linear]
        pruned += [(m, "in_proj_weight") for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        prune.global_unstructured(pruned, prune.L1Unstructured, amount=0.5)
        return model
    if name == "brevitas_lenet":
        return _quant_lenet()
    if name == "torchao_qat":
        quantization, qat = _import("torchao.quantization"), _import("torchao.quantization.qat")
        model = MLP()
        quantization.quantize_(model, qat.QATConfig(
            activation_config=qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=qat.IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
        return model
    bnb, peft = _import("bitsandbytes"), _import("peft")
    model = MLP()
    quantized = bnb.nn.Linear4bit(64, 128, compute_dtype=torch.float32, quant_type="nf4")
    quantized.load_state_dict(model.fc1.state_dict())
    model.fc1 = quantized.to("cpu")  # the move quantizes the weight (NF4)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "rest.0"]))


def problem(name: str, dtype=torch.float32):
    """(batch, loss(model, batch)): one random batch of `name`'s inputs and 10-class labels, cross-entropy."""
    g = torch.Generator().manual_seed(1)
    shape = {"prune_cnn": (BATCH, 3, 16, 16), "brevitas_lenet": (BATCH, 3, 16, 16),
             "prune_transformer": (BATCH, 8, 64)}.get(name, (BATCH, 64))
    batch = torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, CLASSES, (BATCH,), generator=g)
    return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def factor_gaps(name: str) -> str:
    """'A Δ, S Δ (n linear)': the first statistic step's K-FAC A and S of every nn.Linear block against plain hooks
    on a second build from the same seed (a pruned module cannot be deep-copied), relative to the largest entry."""
    torch.manual_seed(0)
    model = build(name)
    torch.manual_seed(0)
    reference = build(name)
    batch, loss_of = problem(name, torch.get_default_dtype())
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0)
    loss_of(c, batch).backward()
    modules = dict(reference.named_modules())
    linear = [b.name for b in c.layers.blocks if type(modules.get(b.name)) is nn.Linear]
    with hooked_calls(reference, linear) as records:
        loss_of(reference, batch).backward()
    c.step()
    a_gap = s_gap = 0.0
    for n in linear:
        A, s_sum = linear_factors(records[n], modules[n].bias is not None)
        stats = c.statistics(n)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
        s_gap = max(s_gap, ((stats["S"] - BATCH * s_sum).abs().max() / stats["S"].abs().max()).item())
    return f"A {a_gap:.0e}, S {s_gap:.0e} ({len(linear)} linear)" if linear else "no linear block"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ': the compiled float64 model beside a second build over 3 steps, then the factors.
    brevitas' activation scales count their training forwards (`counter`, runtime statistics over the first 300),
    and loading a state dict sets that count to its end (the scale is then a loaded one): the reference, which
    the lockstep loads with the compiled model's parameters after each step, takes the compiled model's counts
    before each forward, so that both forwards compute the same function."""
    dtype = torch.float32 if name in FLOAT32_ONLY else torch.float64

    def loss_for(model):
        batch, loss_of = problem(name, dtype)
        counted = [m for m in model.modules() if hasattr(m, "counter")]
        before = []

        def loss(m):
            if isinstance(m, gnfx.CompiledModel):  # the compiled model's forward comes first in each step
                before[:] = [c.counter for c in counted]
            else:
                for module, count in zip([r for r in m.modules() if hasattr(r, "counter")], before):
                    module.counter = count
            return loss_of(m, batch)
        return loss
    if name not in FLOAT32_ONLY:
        return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name))
    torch.manual_seed(0)
    model = build(name)
    torch.manual_seed(0)
    reference = build(name)
    loss = loss_for(model)
    gaps = lockstep_gaps(gnfx.compile(model, kind, **hparams), model, reference, lambda m, _: loss(m), 3, seed=100,
                         parameters_only=name == "bnb_qlora")  # (a 4-bit layer's state dict does not load into it)
    return f"{gaps[0]:.0e}, {gaps[1]:.0e} (float32); {factor_gaps(name)}"


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]
    return problem_row(name, optimizer, kind, hparams, steps, build, problem, exactness)


def off_mask_table(steps: int = 6) -> None:
    """Prints, per pruned model and optimizer (kfac at defaults, kfac_lr, shampoo, adamw), the largest |change| of
    the pruned entries of every `*_orig` parameter over `steps` steps on the probe's batch, and of the kept ones:

        PYTHONPATH=. OMP_NUM_THREADS=1 python -c "from benchmarks.quant_probe import off_mask_table; off_mask_table()"
    """
    print("| model | optimizer | pruned entries' largest change | kept entries' largest change |\n|---|---|---|---|")
    for name in ("prune_mlp", "prune_cnn", "prune_transformer"):
        for optimizer, (kind, hparams) in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = build(name)
            batch, loss_of = problem(name)
            pruned = [(m, n[:-len("_orig")]) for m in model.modules() for n, _ in m.named_parameters(recurse=False)
                      if n.endswith("_orig")]
            before = [getattr(m, f"{n}_orig").detach().clone() for m, n in pruned]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = step = (gnfx.compile(model, kind, **hparams) if kind != "adamw" else None)
                if c is None:
                    c, step = model, torch.optim.AdamW(model.parameters(), **hparams)
                for _ in range(steps):
                    loss_of(c, batch).backward()
                    step.step()
                    step.zero_grad()
            moved = [(getattr(m, f"{n}_orig").detach() - b, getattr(m, f"{n}_mask")) for (m, n), b in zip(pruned, before)]
            off = max(d[mask == 0].abs().max().item() for d, mask in moved)
            on = max(d[mask != 0].abs().max().item() for d, mask in moved)
            print(f"| {name} | {optimizer} | {off:.1e} | {on:.1e} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.quant_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad; A, S (float64) | losses | outside the "
                "blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"], steps=6,
               timeout=300)


if __name__ == "__main__":
    main()
