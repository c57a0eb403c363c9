"""Muon (gnfx/preconditioners/muon.py): the Newton–Schulz iteration against the SVD, a step against
torch.optim.Muon + AdamW and against a float64 reference built from the SVD, which parameters it
orthogonalizes, conv kernels as matrices, attention projections per head (against the heads the
attention modules compute and a float64 reference per head slice), checkpoints and the report."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.preconditioners.muon import COEFFICIENTS, Muon, newton_schulz, shape_scale
from tests.models import CNN, GPT, make_attention

LR, ADAMW_LR, WD, MU = 0.02, 0.1, 0.01, 0.95


def polar_power(X: torch.Tensor, steps: int) -> torch.Tensor:
    """U p^steps(Σ / ‖X‖_F) Vᵀ from the SVD X = U Σ Vᵀ, p(σ) = aσ + bσ³ + cσ⁵: what the iteration
    computes, built without a matrix product of the iteration."""
    a, b, c = COEFFICIENTS
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    s = S / torch.linalg.matrix_norm(X).unsqueeze(-1)
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return U @ torch.diag_embed(s) @ Vh


@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 9, 4), (2, 16, 16)])
def test_newton_schulz_keeps_the_singular_vectors_and_lands_the_singular_values_near_one(shape):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    O = newton_schulz(X, 5)
    # exact: the quintic acts on the singular values alone (five products of matrices of norm <= 1.21)
    torch.testing.assert_close(O, polar_power(X, 5), rtol=0, atol=1e-12)
    # the quintic does not converge to U Vᵀ: singular values >= 0.002 ‖X‖_F end in [0.68, 1.21]
    S = torch.linalg.svdvals(X)
    assert (S >= 2e-3 * torch.linalg.matrix_norm(X).unsqueeze(-1)).all()
    s = torch.linalg.svdvals(O)
    assert 0.68 <= s.min() and s.max() <= 1.21
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    assert torch.linalg.matrix_norm(O - U @ Vh, ord=2).max() <= 0.32


def mlp(dtype=torch.float32):
    """Its hidden matrices: layers 2 (24 x 16, scale sqrt(1.5)) and 4 (16 x 24); 0 reads the input, 6 is the output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(),
                         nn.Linear(16, 5)).to(dtype)


def split(model) -> tuple[list, list]:
    """(the hidden weights, the rest) of `mlp()`, as a user of torch.optim.Muon writes it."""
    hidden = [model[2].weight, model[4].weight]
    return hidden, [p for p in model.parameters() if all(p is not h for h in hidden)]


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 12, generator=g, dtype=dtype), torch.randint(0, 5, (32,), generator=g)


def train(model, step, x, y, steps):
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        step()


def compile_with_adamw_lr(model, **hparams):
    """gnfx's "muon" with the parameters that are not hidden weights in a param group at ADAMW_LR·lr
    and weight decay λ/ADAMW_LR (so that it decays by (1 - lr·λ)): the input and output layers
    (the diagonal preconditioner, the plan's fallback) and the hidden biases (Muon's AdamW)."""
    hidden, rest = split(model)
    c = gnfx.compile(model, optimizer="muon", lr=LR, weight_decay=WD, momentum=MU, **hparams)
    c.optimizer.param_groups[0]["params"] = hidden
    c.optimizer.add_param_group({"params": rest, "lr": LR * ADAMW_LR, "weight_decay": WD / ADAMW_LR})
    return c


def test_steps_equal_torch_muon_on_the_hidden_matrices_and_adamw_on_the_rest():
    x, y = data()
    ref = mlp()
    hidden, rest = split(ref)
    # AdamW at ADAMW_LR·lr, with weight decay λ/ADAMW_LR so that it decays by (1 - lr·λ) as gnfx does
    optimizers = [torch.optim.Muon(hidden, lr=LR, weight_decay=WD, momentum=MU),
                  torch.optim.AdamW(rest, lr=LR * ADAMW_LR, weight_decay=WD / ADAMW_LR)]

    def ref_step():
        for o in optimizers:
            o.step()
            o.zero_grad()

    start = [p.detach().clone() for p in ref.parameters()]
    c = compile_with_adamw_lr(mlp(), ns_dtype="bfloat16")  # torch.optim.Muon's iteration runs in bfloat16
    train(ref, ref_step, x, y, 3)
    train(c, lambda: (c.step(), c.zero_grad()), x, y, 3)
    for p0, p, q in zip(start, ref.parameters(), c.parameters()):
        # the same operations in the same order; bfloat16 products may round apart by an ulp (2⁻⁸)
        torch.testing.assert_close(q - p0, p - p0, rtol=0, atol=2 ** -8 * (p - p0).abs().max().item())


def test_float64_steps_equal_the_reference_from_the_svd():
    """Two steps, so that the momentum matters: Muon from the SVD (polar_power) on the hidden
    weights, torch.optim.AdamW on the rest, in float64; Adam's betas and eps not the defaults, so
    that they are seen to reach both the plan's fallback "diag" and Muon's AdamW."""
    x, y = data(torch.float64)
    ref = mlp(torch.float64)
    hidden, rest = split(ref)
    betas, eps = (0.8, 0.99), 1e-3
    adamw = torch.optim.AdamW(rest, lr=LR * ADAMW_LR, weight_decay=WD / ADAMW_LR, betas=betas, eps=eps)
    buffers = [torch.zeros_like(w) for w in hidden]

    @torch.no_grad()
    def ref_step():
        for w, M in zip(hidden, buffers):
            M.mul_(MU).add_(w.grad, alpha=1 - MU)
            X = (1 - MU) * w.grad + MU * M  # Nesterov
            scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
            w.mul_(1 - LR * WD).sub_(LR * scale * polar_power(X.unsqueeze(0), 5)[0])
            w.grad = None
        adamw.step()
        adamw.zero_grad()

    c = compile_with_adamw_lr(mlp(torch.float64), betas=betas, eps=eps)
    train(ref, ref_step, x, y, 2)
    train(c, lambda: (c.step(), c.zero_grad()), x, y, 2)
    for p, q in zip(ref.parameters(), c.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


class Mixed(nn.Module):
    """An embedding (the input layer), hidden linear layers (with and without bias), a norm, and an
    output layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.norm(self.fc1(self.emb(tokens).flatten(1)))
        return self.head(torch.relu(self.fc2(torch.relu(h))))


def routed(c) -> tuple[set, set, set]:
    """(parameters Muon orthogonalizes, parameters its AdamW steps, parameters "diag" steps)."""
    muon, adamw, diag = set(), set(), set()
    for pre in c.optimizer.preconditioners:
        if pre.name == "diag":
            diag.update([n for b in pre.blocks for n in b.params] + pre.param_names)
            continue
        assert pre.name == "muon"
        for group in pre.groups:
            (adamw if pre.is_adamw(group) else muon).update(n for p in group.pieces for n in p.target.params)
    return muon, adamw, diag


DECLINED = "optimizer='muon': muon serves hidden matrices only: diag"


def test_hidden_matrices_get_muon_their_biases_adamw_and_every_other_block_diag():
    c = gnfx.compile(Mixed(), optimizer="muon")
    c(torch.randint(0, 10, (5, 3)))
    assert [b.name for b in c.layers if b.model_input] == ["emb"]
    assert [b.name for b in c.layers if b.model_output] == ["head"]
    mlp_table = gnfx.compile(mlp(), optimizer="muon").layers
    assert [(b.name, b.model_input, b.model_output) for b in mlp_table] == [
        ("0", True, False), ("2", False, False), ("4", False, False), ("6", False, True)]
    assert routed(c) == ({"fc1.weight", "fc2.weight"}, {"fc1.bias"},
                         {"emb.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"})
    entries = c.layers.plan.entries
    assert {n: (e.name, e.reason) for n, e in entries.items()} == {
        "emb": ("diag", DECLINED), "fc1": ("muon", "optimizer='muon'"), "norm": ("diag", DECLINED),
        "fc2": ("muon", "optimizer='muon'"), "head": ("diag", DECLINED)}
    assert DECLINED in str(c)  # the report's reason column
    # a language model: its tied embedding and unembedding is the output layer, the position table
    # and the norms are no plain matrices
    gpt = gnfx.compile(GPT(attentions=("sdpa",)), optimizer="muon")
    gpt(torch.randint(0, 48, (2, 8)))
    muon, adamw, diag = routed(gpt)
    assert muon == {b.weight for b in gpt.layers if b.kind == "linear" and b.name != "emb"}
    assert adamw == {b.bias for b in gpt.layers if b.weight in muon and b.bias is not None}
    assert {"emb.weight", "pos"} <= diag and all(b.weight in diag for b in gpt.layers if b.kind == "norm")
    assert muon | adamw | diag == {n for n, _ in gpt.named_parameters()}


def test_a_muon_policy_plans_as_the_name_and_a_pattern_muon_declines_entirely_is_refused():
    c = gnfx.compile(Mixed(), optimizer={"*": "muon"})
    c(torch.randint(0, 10, (5, 3)))
    assert {n: (e.name, e.reason) for n, e in c.layers.plan.entries.items() if e.name == "diag"} == {
        n: ("diag", "pattern '*': muon serves hidden matrices only: diag") for n in ("emb", "norm", "head")}
    with pytest.raises(gnfx.ConfigError, match="'head' takes nothing.*not served by muon"):
        gnfx.compile(Mixed(), optimizer={"head": "muon", "*": "diag"})(torch.randint(0, 10, (5, 3)))


def test_step_quadratic_is_refused_for_muon_whose_momentum_it_would_zero():
    with pytest.raises(gnfx.ConfigError, match="'muon' cannot take step='quadratic'.*step='lr'"):
        gnfx.compile(mlp(), optimizer="muon", step="quadratic", loss="cross_entropy")
    with pytest.raises(gnfx.ConfigError, match="'muon' cannot take step='quadratic'"):
        gnfx.compile(mlp(), optimizer={"2": "muon", "*": "kfac"}, step="quadratic", loss="cross_entropy")


def test_hidden_conv_kernels_are_orthogonalized_as_output_by_input_patch_matrices():
    model = CNN().double()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(6) % 5
    before = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="muon", lr=LR)
    F.cross_entropy(c(x), y).backward()
    grads = {n: p.grad.clone() for n, p in c.named_parameters()}
    c.step()
    shapes = {p.target.params[0]: g.shape for g in c.optimizer.curvature[0].groups for p in g.pieces}
    assert routed(c)[0] == {"conv2.weight"}  # conv1 reads the input, the head is the output layer
    assert {b.name for b in c.layers if c.layers.plan.entries[b.name].name == "muon"} == {"conv2"}
    for name in ("conv2.weight",):
        w0, w = before.get_parameter(name), c.get_parameter(name)
        assert shapes[name] == (w.shape[0], w[0].numel())  # (C_out, C_in·k·k)
        G = grads[name].flatten(1)
        X = (1 - MU) * G + MU * (1 - MU) * G  # Nesterov on the first step
        scale = max(1.0, G.shape[0] / G.shape[1]) ** 0.5
        expected = w0.flatten(1) - LR * scale * polar_power(X.unsqueeze(0), 5)[0]
        torch.testing.assert_close(w.detach().flatten(1), expected, rtol=0, atol=1e-12)


def test_a_checkpoint_resumes_exactly():
    x, y = data()

    def run(steps, checkpoint=None):
        c = gnfx.compile(mlp(), optimizer="muon", lr=LR)
        if checkpoint is not None:
            c.load_state_dict(checkpoint[0])
            c.optimizer.load_state_dict(checkpoint[1])
        train(c, lambda: (c.step(), c.zero_grad()), x, y, steps)
        return c

    first = run(2)
    checkpoint = copy.deepcopy((first.state_dict(), first.optimizer.state_dict()))
    straight = run(2, checkpoint)
    train(first, lambda: (first.step(), first.zero_grad()), x, y, 2)
    for p, q in zip(first.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_report_and_cost_show_muon():
    c = gnfx.compile(Mixed(), optimizer="muon")
    tokens = torch.randint(0, 10, (5, 3))
    F.cross_entropy(c(tokens), torch.arange(5) % 3).backward()
    c.step()
    text = str(c)
    assert "muon" in text and "fc1" in text
    cost = c.cost()
    assert [cost[n].preconditioner for n in ("emb", "fc1", "norm", "fc2", "head")] == [
        "diag", "muon", "diag", "muon", "diag"]
    # a hidden matrix without bias keeps its buffer M alone; one with a bias adds AdamW's state for it
    assert cost["fc2"].memory_bytes == 16 * 16 * 4
    assert cost["fc1"].memory_bytes == (16 * 12 + 16 * 2 + 1) * 4
    # every row's memory is the state allocated for its parameters, counted from the tensors
    owner = {n: b.name for b in c.layers for n in b.params}
    allocated = dict.fromkeys(owner.values(), 0)
    for pre in c.optimizer.curvature:
        for group in pre.groups:
            for v in pre.group_state(group).values():
                for piece in group.pieces:
                    allocated[owner[piece.target.params[0]]] += v.numel() // len(group.pieces) * v.element_size()
    for name, state in ((n, c.optimizer.state_of(n)) for p in c.optimizer.elementwise for n in
                        [m for b in p.blocks for m in b.params] + p.param_names):
        allocated[owner[name]] += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    assert {r.name: r.memory_bytes for r in cost.rows} == allocated


def test_muon_is_no_auto_candidate():
    assert not Muon.in_auto
    c = gnfx.compile(mlp(), optimizer="auto", memory_budget=1e6, compute_budget=1e6)
    assert {e.name for e in c.layers.plan.entries.values()}.isdisjoint({"muon"})


HEADS, D = 2, 8
ATTENTION_KINDS = ("sdpa", "handwritten", "mha")  # fused qkv (split, view), separate q, k, v, nn.MultiheadAttention


def attention_between(kind):
    """A linear input layer, attention (its projections are hidden matrices), a linear output layer; float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, D), make_attention(kind, D, HEADS), nn.Linear(D, 3)).double()


def projection_pieces(c) -> dict:
    """{block: (its role, the regions of its weight Muon orthogonalizes one by one, in order)}."""
    (pre,) = [p for p in c.optimizer.curvature if p.name == "muon"]
    pieces = {}
    for group in pre.groups:
        for piece in group.pieces:
            if not pre.is_adamw(group):
                pieces.setdefault(piece.target.name, (piece.target.block.role, []))[1].append(piece.index)
    return pieces


def compile_per_head(model):
    return gnfx.compile(model, optimizer="muon", lr=LR, momentum=MU, per_head=True, heads=HEADS,
                        example_inputs=(torch.randn(2, 5, 4, dtype=torch.float64),))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_head_slices_are_the_heads_the_attention_module_computes(kind):
    """Perturbing the rows of head slice i of a q, k or v projection changes, of the attention's
    per-head outputs (the input of the output projection, recovered from the module's output),
    exactly the columns of the output projection's slice of head i mod h: gnfx's slices are the
    module's own heads."""
    model = attention_between(kind)
    attention = model[1]
    pieces = projection_pieces(compile_per_head(model))
    roles = {role: (name, regions) for name, (role, regions) in pieces.items()}
    out_name, out_regions = roles.pop("attention.out")
    assert [r[1] for r in out_regions] == [slice(j * D // HEADS, (j + 1) * D // HEADS) for j in range(HEADS)]
    assert sorted(roles) == (["attention.qkv"] if kind != "handwritten" else ["attention.k", "attention.q", "attention.v"])
    params = dict(model.named_parameters())
    W_o, b_o = params[out_name + ".weight"], params[out_name + ".bias"]
    x = torch.randn(3, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def head_outputs():  # y of out = W_o y + b_o, per position
        return torch.linalg.solve(W_o, (attention(x) - b_o).unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        y = head_outputs()
        for name, regions in roles.values():
            W = params[name + ("_weight" if name.endswith("in_proj") else ".weight")]
            assert len(regions) == HEADS * (3 if W.shape[0] == 3 * D else 1)
            for i, region in enumerate(regions):
                W[region] += 1.0
                changed = (head_outputs() - y).abs().amax((0, 1)) > 1e-9
                W[region] -= 1.0
                expected = torch.zeros(D, dtype=torch.bool)
                expected[out_regions[i % HEADS][1]] = True
                assert torch.equal(changed, expected), (name, i)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_per_head_step_is_newton_schulz_of_each_head_slice(kind):
    """One float64 step: each head slice P of a projection's weight moves by -η s(P) NS₅(G_P), with
    NS₅ from the SVD (polar_power) of the slice of the gradient G alone and s the slice's shape
    scale; whole-matrix orthogonalization would move it otherwise."""
    model = attention_between(kind)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (reference(x) ** 2).mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    c = compile_per_head(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (c(x) ** 2).mean().backward()
    c.step()
    params = dict(model.named_parameters())
    for name, (role, regions) in projection_pieces(c).items():
        weight = name + ("_weight" if name.endswith("in_proj") else ".weight")
        G, step = grads[weight], params[weight].detach() - before[weight]
        for region in regions:
            rows, cols = G[region].shape
            expected = -LR * shape_scale("original", rows, cols) * polar_power(G[region], 5)
            torch.testing.assert_close(step[region], expected, rtol=0, atol=1e-12)
        whole = -LR * shape_scale("original", *G.shape) * polar_power(G, 5)
        assert (step - whole).abs().max() > 1e-3, role


def test_per_head_needs_the_number_of_heads_and_divisible_projections():
    with pytest.raises(gnfx.ConfigError, match="heads=h"):
        gnfx.compile(attention_between("sdpa"), optimizer="muon", per_head=True,
                     example_inputs=(torch.randn(2, 5, 4, dtype=torch.float64),))
    with pytest.raises(gnfx.ConfigError, match="not divisible into heads=3"):
        gnfx.compile(attention_between("sdpa"), optimizer="muon", per_head=True, heads=3,
                     example_inputs=(torch.randn(2, 5, 4, dtype=torch.float64),))
