"""The compiled model as a module: same parameters and state_dict, the same numbers as the
original, the inspection views, the accounting of every parameter, and the errors for bad input.
"""
from __future__ import annotations

import os
import subprocess
import sys

import networkx as nx
import pytest
import torch
from torch import nn

import gnfx
from models import SquashedAffine
from references import cross_entropy

DTYPE = torch.float64


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d=4, hidden=5, classes=3):
        super().__init__()
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Residual(nn.Module):
    """A SquashedAffine (a fallback), a residual connection, a bias-free layer and a buffer."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.norm = SquashedAffine(d)
        self.fc = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, classes)
        self.register_buffer("shift", torch.linspace(-1, 1, d))

    def forward(self, x):
        h = self.norm(x + self.shift)
        return self.head(h + torch.relu(self.fc(h)))


class Tied(nn.Module):
    def __init__(self, d=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class DiagonalReuse(nn.Module):
    """fc.weight is both a linear layer's weight and, through its diagonal, an elementwise scale.
    (`x @ self.fc.weight.T` would not do: that is a hand-written linear map, a second site.)"""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) * self.fc.weight.diagonal())


class Penalized(MLP):
    """a.weight is also summed into the output (a penalty-like second use)."""

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + self.a.weight.sum()


MODELS = {
    "mlp": (MLP, (6, 4)),
    "tokens": (MLP, (6, 3, 4)),
    "residual": (Residual, (6, 4)),
    "tied": (Tied, (6, 3, 4)),
}


def make(name, seed=0):
    cls, shape = MODELS[name]
    torch.manual_seed(seed)
    model = cls().to(DTYPE)
    x = torch.randn(*shape, dtype=DTYPE)
    y = torch.randint(0, 3, shape[:-1])
    return model, x, y


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----------------------------------------------------------------------------- the same module


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_and_parameters_are_the_originals(name):
    model, _, _ = make(name)
    c = gnfx.compile(model)
    assert isinstance(c, nn.Module) and isinstance(c.optimizer, torch.optim.Optimizer)
    assert list(c.state_dict()) == list(model.state_dict())
    original = dict(model.named_parameters())
    assert list(dict(c.named_parameters())) == list(original)
    assert all(p is original[n] for n, p in c.named_parameters())
    # loading into the compiled model loads into the original
    other, _, _ = make(name, seed=1)
    c.load_state_dict(other.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", MODELS)
def test_instrumented_graph_computes_exactly_the_original_outputs_and_gradients(name, capture):
    model, x, y = make(name)
    options = dict(example_inputs=(x,)) if capture == "export" else {}
    c = gnfx.compile(model, capture=capture, stat_every=1, statistics=("A", "S", "diag"), **options)
    assert c.layers.form == capture
    taps = [m for n, m in c.graph_module.named_modules() if n.startswith("gnfx_taps.")]
    assert len(taps) == 2 * sum(len(b.sites) for b in c.layers) > 0
    params = [p for p in model.parameters()]

    expected = model(x)
    expected_grads = torch.autograd.grad(cross_entropy(expected, y), params)

    tap_calls = count_calls(taps[0])
    for out in (c.graph_module(x), c(x)):  # directly, and through the compiled model
        grads = torch.autograd.grad(cross_entropy(out, y), params)
        assert torch.equal(out, expected)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert tap_calls[0] == 2


def test_eval_mode_and_no_grad_forwards_collect_no_statistics():
    model, x, y = make("mlp")
    c = gnfx.compile(model, stat_every=1, statistics=("A", "S"))
    tap_calls = count_calls(c.graph_module.gnfx_taps.a_a)
    c.eval()
    assert not model.training and not any(m.training for m in model.modules())
    cross_entropy(c(x), y).backward()
    c.train()
    with torch.no_grad():
        c(x)
    c.step()
    assert tap_calls[0] == 0
    for name in ("a", "b"):
        with pytest.raises(gnfx.errors.StatisticsError, match="no statistics yet: they exist after the first"):
            c.statistics(name)
    # a training forward with gradients does collect
    cross_entropy(c(x), y).backward()
    c.step()
    assert tap_calls[0] == 1 and set(c.statistics("a")) == {"A", "S"}


def test_a_model_moved_after_compile_keeps_statistics_where_its_parameters_are():
    """gnfx.compile(model).to(...) before training: the statistics made at the capture follow the
    parameters (.double(): float64 statistics), so the training is that of the model compiled after
    the move (ekfac: statistics and refreshes on every step from the first)."""
    moved, x, y = make("mlp")
    moved, direct = moved.float(), make("mlp")[0]  # the same weights, compiled in float32 and in float64
    compiled = [gnfx.compile(moved, "ekfac", loss="cross_entropy", stat_every=1).double(),
                gnfx.compile(direct, "ekfac", loss="cross_entropy", stat_every=1)]
    for _ in range(3):
        for c in compiled:
            torch.manual_seed(0)  # the same sampled labels (fisher="mc")
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
    assert compiled[0].statistics("a")["A"].dtype == torch.float64
    for p, q in zip(moved.parameters(), direct.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_statistics_by_name_explain_missing_names():
    model, x, y = make("residual")
    c = gnfx.compile(model)  # grad2 needs no statistics
    with pytest.raises(KeyError, match="no block named 'norm'.*'fc', 'head'"):
        c.statistics("norm")
    with pytest.raises(KeyError, match="statistics=") as err:
        c.statistics("fc")
    assert "collects no statistics" in str(err.value)


def test_statistics_before_the_first_statistic_step_say_when_they_exist():
    model, x, y = make("mlp")
    c = gnfx.compile(model, optimizer="kfac")
    with pytest.raises(gnfx.errors.StatisticsError, match="block 'a' has no statistics yet: they exist after the "
                                                          "first statistic step") as err:
        c.statistics("a")
    assert isinstance(err.value, KeyError) and isinstance(err.value, gnfx.GnfxError)
    cross_entropy(c(x), y).backward()
    c.step()
    assert set(c.statistics("a")) == {"A", "S"}


# ----------------------------------------------------------------------------- inspection


def test_report_shows_blocks_shapes_preconditioners_and_the_registration_table():
    model, _, _ = make("residual")
    c = gnfx.compile(model)
    text = str(c)
    assert text == c.report() == repr(c)
    assert "2 curvature blocks" in text and "fx" in text
    # each block with the shapes of its factors and its preconditioner
    lines = text.splitlines()
    fc = next(line for line in lines if line.startswith("fc "))
    assert fc.split()[:6] == ["fc", "linear", "A4x4", "S4x4", "W4x4", "diag"]
    head = next(line for line in lines if line.startswith("head "))
    assert head.split()[:6] == ["head", "linear", "A5x5", "S3x3", "W3x4", "diag"]
    # the registration table accounts for every parameter, fallbacks with their reason
    table = text[text.index("parameter registration:"):]
    for name, p in model.named_parameters():
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert "x".join(map(str, p.shape)) in row
    assert [(f.param, f.reason) for f in c.layers.fallbacks] == [
        ("norm.weight", "used by call_function 'sigmoid' (node sigmoid), not a layer gnfx models"),
        ("norm.bias", "used by call_function 'tanh' (node tanh), not a layer gnfx models")]
    norm = next(line for line in table.splitlines() if line.startswith("norm.weight "))
    assert "fallback: used by call_function 'sigmoid' (node sigmoid), not a layer gnfx models" in norm
    assert next(line for line in table.splitlines() if line.startswith("head.bias ")).rstrip().endswith("block head")
    assert f"parameters in curvature blocks: {16 + 15} of {16 + 15 + 8}" in text


def test_the_layer_table_prints_the_block_table_of_the_report():
    model, _, _ = make("residual")
    c = gnfx.compile(model)
    text = repr(c.layers)
    assert text.startswith("LayerTable: 2 curvature blocks, 2 fallback parameters, graph captured with fx\n")
    # the report's block table without its state column
    assert [line.split() for line in text.splitlines()[1:7]] == [
        ["block", "kind", "shapes", "preconditioner", "why"], ["-" * 11, "-" * 8, "-" * 14, "-" * 14, "-" * 16],
        ["fc", "linear", "A4x4", "S4x4", "W4x4", "diag", "optimizer='diag'"],
        ["head", "linear", "A5x5", "S3x3", "W3x4", "diag", "optimizer='diag'"],
        ["norm.weight", "fallback", "4", "diag", "optimizer='diag'"],
        ["norm.bias", "fallback", "4", "diag", "optimizer='diag'"]]
    assert "  norm.weight: used by call_function 'sigmoid' (node sigmoid), not a layer gnfx models" in text


def test_blocks_expose_their_parameters_and_shapes():
    model, _, _ = make("residual")
    c = gnfx.compile(model)
    fc, head = c.layers["fc"], c.layers["head"]
    assert (fc.kind, fc.params, fc.weight, fc.bias, fc.d_in, fc.d_out) == ("linear", ("fc.weight",), "fc.weight", None, 4, 4)
    assert head.shapes == {"A": (5, 5), "S": (3, 3), "W": (3, 4)}
    assert head.preconditioner == "diag" and len(head.sites) == 1
    with pytest.raises(KeyError, match="norm"):
        c.layers["norm"]


def test_to_networkx_has_roles_and_tap_nodes():
    model, _, _ = make("tied")
    c = gnfx.compile(model, statistics=("A",))
    g = c.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {n.name for n in c.graph_module.graph.nodes}
    assert all({"op", "target", "role"} <= set(attrs) for _, attrs in g.nodes(data=True))
    taps = [n for n, attrs in g.nodes(data=True) if attrs["role"] == "tap"]
    assert len(taps) == 2 * 3  # an a and a z tap per site: fc twice, head once
    assert all(g.nodes[n]["op"] == "call_module" and g.nodes[n]["target"].startswith("gnfx_taps.") for n in taps)
    linears = [n for n, attrs in g.nodes(data=True) if attrs["role"] == "linear"]
    assert len(linears) == 3
    for lin in linears:  # a tap feeds each linear, and each linear feeds its z tap
        assert any(g.nodes[p]["role"] == "tap" for p in g.predecessors(lin))
        assert [g.nodes[s]["role"] for s in g.successors(lin)] == ["tap"]
    assert nx.is_directed_acyclic_graph(g)


def test_to_dot_is_graphviz_text_of_the_same_graph():
    model, _, _ = make("mlp")
    c = gnfx.compile(model, statistics=("S",))
    dot = c.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for node in c.graph_module.graph.nodes:
        assert f'"{node.name}"' in dot
    assert dot.count("->") == c.to_networkx().number_of_edges()
    assert "lightblue" in dot  # taps are coloured


# ----------------------------------------------------------------------------- parameter accounting


@pytest.mark.parametrize("cls, other_use", [(DiagonalReuse, "diagonal"), (Penalized, "sum")])
def test_weight_with_a_second_use_falls_back_with_a_reason_naming_it(cls, other_use):
    torch.manual_seed(0)
    model = cls().to(DTYPE)
    c = gnfx.compile(model)
    layer = "fc" if cls is DiagonalReuse else "a"
    blocks = [b.name for b in c.layers]
    assert layer not in blocks and len(blocks) == 1
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {f"{layer}.weight", f"{layer}.bias"}
    assert f"'{other_use}'" in reasons[f"{layer}.weight"] and "not a layer gnfx models" in reasons[f"{layer}.weight"]
    assert reasons[f"{layer}.bias"] == f"bias of '{layer}.weight', which is not in a curvature block"
    assert reasons[f"{layer}.weight"] in c.report()
    # every trainable parameter is accounted for exactly once
    accounted = [p for b in c.layers for p in b.params] + [f.param for f in c.layers.fallbacks]
    assert sorted(accounted) == sorted(n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("hparam, value, valid", [
    ("lr", -1, "> 0"),
    ("lr", float("nan"), "> 0"),
    ("stat_every", 0, "integer >= 1"),
    ("stat_every", 2.0, "integer >= 1"),
    ("betas", (1.0, 0.9), "[0, 1)"),
    ("stat_decay", 1.0, "[0, 1)"),
    ("source", "x", "('grad2', 'fisher')"),
    ("kfac_approx", "sum", "('expand', 'reduce')"),
    ("weight_decay", -0.1, ">= 0"),
])
def test_bad_hyperparameters_raise_config_errors_naming_the_value_and_valid_range(hparam, value, valid):
    with pytest.raises(gnfx.ConfigError) as err:
        gnfx.compile(MLP(), **{hparam: value})
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"{hparam}={value!r}" in message and valid in message


def test_unknown_optimizer_and_hyperparameter_names_list_the_valid_ones():
    with pytest.raises(gnfx.ConfigError, match=r"optimizer='adamw' is not a gnfx optimizer; valid names are: .*diag"):
        gnfx.compile(MLP(), optimizer="adamw")
    with pytest.raises(gnfx.ConfigError) as err:
        gnfx.compile(MLP(), learning_rate=0.1)
    assert "'learning_rate'" in str(err.value) and "lr" in str(err.value) and "stat_every" in str(err.value)


def test_compiling_a_compiled_model_raises():
    model = MLP()
    with pytest.raises(gnfx.ConfigError, match="already compiled by gnfx"):
        gnfx.compile(gnfx.compile(model))
    with pytest.raises(gnfx.ConfigError, match="torch.compile.*_orig_mod"):
        gnfx.compile(torch.compile(model))
    with pytest.raises(gnfx.ConfigError, match="torch.nn.Module"):
        gnfx.compile(lambda x: x)


class Autoencoder(MLP):
    """diffusers' AutoencoderKL in miniature: a `config`, and `encode` and `decode` methods beside forward."""

    def __init__(self):
        super().__init__(d=4, hidden=2, classes=4)
        self.config = {"latent_channels": 2}

    def encode(self, x):
        return self.a(x)

    def decode(self, z):
        return self.b(z)

    def forward(self, x):
        return self.decode(self.encode(x))


def test_an_attribute_only_the_original_module_has_is_an_attribute_error_saying_where_it_is():
    """Before, `compiled.encode` raised nn.Module's bare "no attribute 'encode'", which read as if the model
    had none; a training call through it would bypass the statistics, so it stays an AttributeError (hasattr
    is unchanged) that names the module to call and how to train through it."""
    model = Autoencoder()
    c = gnfx.compile(model)
    with pytest.raises(AttributeError, match="encode is another method of it. Call it on that Autoencoder.*"
                                             "write a module whose forward calls it"):
        c.encode(torch.randn(3, 4))
    with pytest.raises(AttributeError, match="config is an attribute of the Autoencoder it was compiled from"):
        c.config
    with pytest.raises(AttributeError, match=r"no attribute 'nothing'$"):
        c.nothing
    assert not hasattr(c, "decode") and c.a is model.a and c.training


def test_gnfx_imports_from_any_working_directory(tmp_path):
    """The installed package imports its passes as gnfx.passes, not from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import gnfx"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
