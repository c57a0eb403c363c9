"""gnfx.register_preconditioner: a preconditioner from outside the package, and the errors for a
class that cannot be one. (examples/custom_preconditioner.py trains, costs, diagnoses and
checkpoints a registered one end to end: tests/test_examples.py.)"""
import pytest
import torch
from torch import nn

import gnfx
from gnfx.errors import ConfigError, NoCostModel
from gnfx.preconditioners import REGISTRY
from gnfx.preconditioners.base import Candidate, Preconditioner
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.preconditioners.diag import Diagonal
from gnfx.preconditioners.kfac import KFAC


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the registry as it found it."""
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def compile_mlp(optimizer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return gnfx.compile(net, optimizer=optimizer, example_inputs=(torch.randn(2, 4),))


def curvature_class(name, **attributes):
    def init_group(self, group):
        return {}

    def direction(self, G, state, collect):
        return G

    return type(name.title(), (CurvaturePreconditioner,), {"name": name, "init_group": init_group,
                                                           "direction": direction, **attributes})


def test_a_registered_class_is_an_optimizer_name_and_registering_it_again_does_nothing():
    cls = curvature_class("plain_gradient")
    assert gnfx.register_preconditioner(cls) is cls
    assert gnfx.register_preconditioner(cls) is cls
    assert REGISTRY["plain_gradient"] is cls
    model = compile_mlp("plain_gradient")
    assert {type(p) for p in model.optimizer.curvature} == {cls}


@pytest.mark.parametrize("bad,needle", [
    (int, "subclass of gnfx.preconditioners.curvature.CurvaturePreconditioner"),
    (type("Clash", (KFAC,), {}), "taken by gnfx.preconditioners.kfac.KFAC"),
    (curvature_class("two words".replace(" ", "-")), "must be a Python identifier"),
    (curvature_class("states"), "must be a Python identifier"),
    (type("NoDirection", (CurvaturePreconditioner,), {"name": "no_direction", "init_group": lambda s, g: {}}),
     "does not define direction"),
    (type("NoUpdate", (Preconditioner,), {"name": "no_update"}), "does not define update"),
    (curvature_class("bad_hparams", HPARAMS={"beta": 0.9}), "must map names to gnfx.hparams.HParam"),
    (curvature_class("auto_without_cost", in_auto=True), "in_auto is set but it has no cost_parts"),
    (curvature_class("old_tail", safeguard=lambda self, Us, Gs, lr: None), "defines safeguard, which gnfx no longer"),
])
def test_what_is_not_a_preconditioner_is_refused_naming_the_fix(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        gnfx.register_preconditioner(bad)
    assert bad not in REGISTRY.values()


def test_without_cost_formulas_the_report_says_unknown_and_model_cost_names_the_fix():
    gnfx.register_preconditioner(curvature_class("costless"))
    model = compile_mlp("costless")
    report = str(model)
    rows = [line.split() for line in report.splitlines() if "costless" in line.split()]
    assert len(rows) == 2 and all("unknown" in row for row in rows)
    with pytest.raises(NoCostModel, match="define the classmethod cost_parts"):
        model.cost()


def test_auto_chooses_among_registered_candidates_by_fidelity():
    class DiagonalFirst(Diagonal):
        """The diagonal preconditioner, offered to "auto" as more faithful than any built-in."""
        name = "diagonal_first"

        @classmethod
        def auto_candidates(cls, hp, g):
            return [Candidate(-1, hp, "first")]

    built_in = {e.name for e in compile_mlp("auto").layers.plan.entries.values()}
    gnfx.register_preconditioner(DiagonalFirst)
    model = compile_mlp("auto")
    entries = model.layers.plan.entries
    assert {entries[b.name].name for b in model.layers} == {"diagonal_first"}
    assert all(entries[b.name].reason.startswith("auto (first)") for b in model.layers)
    assert "diagonal_first" not in built_in


def test_cost_formulas_by_name_are_the_class_formulas_and_an_unknown_name_is_refused():
    from gnfx import cost
    from gnfx.errors import GnfxError

    hp = {k: v.default for k, v in KFAC.HPARAMS.items()}
    g = cost.block_geometry("linear", True, cost.SYMBOLS)
    sizes = {cost.FACTOR: 4, cost.INT64: 8}
    assert cost.formulas("kfac", hp, g).as_dict(sizes) == cost.formulas(KFAC, hp, g).as_dict(sizes)
    with pytest.raises(GnfxError, match="no preconditioner is registered as 'nope'; registered: diag"):
        cost.formulas("nope", hp, g)
