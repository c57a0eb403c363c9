"""`ParameterStore`: the parameters a GnfxOptimizer steps, as its components see them.

The preconditioners, the generated update function (gnfx.codegen), the quadratic-model step
(gnfx.quadratic_step) and the FSDP2 step (gnfx.fsdp) are given one store at construction and read
everything about the parameters from it, never from the optimizer:

- `named`: the parameters θ by name (under FSDP2 the sharded DTensors);
- `param(name)`: what a component steps for θ: the parameter itself, or under FSDP2 its local
  shard or the full-size stand-in of a target this rank owns during the step (`views`), or for the
  parameter of W's shape of a reparametrized block (v of a weight-normed one) during the step the
  stand-in holding its weight W (`reparametrizations`, gnfx.reparametrization: `gather` before the
  step, `scatter` after it);
- `state_of(name)`: θ's entry of the optimizer's per-parameter state, which `state_dict` carries;
- `group_of(name)`: θ's param group (its lr, weight decay, betas, eps), indexed by `sync_groups`;
- `sharded`: the gnfx.fsdp.ShardedStep once the parameters are FSDP2 shards, else None.

`state` and `param_groups` are the optimizer's own containers (torch.optim.Optimizer's), the same
objects: the optimizer gives the store the new ones when torch's `load_state_dict` replaces them
(`bind`).
"""
from __future__ import annotations

import torch

from gnfx.errors import ConfigError
from gnfx.reparametrization import Reparametrizations


def held_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor `model` holds at parameter `name` now: the Parameter, FSDP2's unsharded copy during a
    forward, or the plain tensor torch.func.functional_call put in its place for a call (which
    nn.Module.get_parameter refuses)."""
    return getattr(*holder(model, name))


def holder(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(the submodule of `model` that holds parameter `name`, its attribute there): `held_tensor` is
    getattr of them, which a caller that reads the same parameters at every step can keep (the submodules
    stay; what they hold at the attribute changes under FSDP2 and functional_call)."""
    owner, _, field = name.rpartition(".")
    return model.get_submodule(owner), field


class ParameterStore:
    def __init__(self, named: dict, state: dict, param_groups: list):
        self.named = dict(named)
        self.views: dict[str, torch.Tensor] = {}  # under FSDP2: what `param` returns (gnfx.fsdp)
        self.sharded = None  # the gnfx.fsdp.ShardedStep under FSDP2
        self.groups_version = 0
        self._groups_seen = None
        self._group_index: dict[int, dict] = {}
        self.reparametrizations = Reparametrizations(())  # the reparametrized blocks' (gnfx.reparametrization)
        self.bind(state, param_groups)

    def bind(self, state: dict, param_groups: list) -> None:
        """Read the state and groups from these containers (the optimizer's, after torch replaced them)."""
        self.state = state
        self.param_groups = param_groups
        self._groups_seen = None

    def param(self, name: str) -> torch.Tensor:
        """The parameter `name`; under FSDP2 its local shard, or the full-size stand-in of a
        target this rank owns during the step (gnfx.fsdp); for the parameter of W's shape of a
        reparametrized block, during the step, the stand-in holding W (gnfx.reparametrization)."""
        standin = self.reparametrizations.standins.get(name)
        if standin is not None:
            return standin
        return self.views.get(name, self.named[name])

    def reparametrize(self, reparametrizations) -> None:
        """Step the blocks whose weights these gnfx.reparametrization objects compute in W's space."""
        self.reparametrizations = Reparametrizations(reparametrizations)

    def gather(self) -> None:
        """Before a step: the stand-ins of the reparametrized blocks' W, with ∇W (gnfx.reparametrization)."""
        if self.reparametrizations:
            self.reparametrizations.gather(self.named)

    def scatter(self) -> None:
        """After a step's update chain: the stand-ins' change pulled back to the parameters
        (gnfx.reparametrization)."""
        if self.reparametrizations:
            self.reparametrizations.scatter(self.named)

    def release(self) -> None:
        """At a step's end: the stand-ins dropped, pulled back or not (a step that raised leaves the
        parameters as the scatter found them)."""
        self.reparametrizations.release()

    def state_of(self, name: str) -> dict:
        """The optimizer state of parameter `name`."""
        return self.state[self.named[name]]

    def sync_groups(self) -> int:
        """Re-index parameter -> param group if the groups changed; returns the groups' version,
        which increases with every change (components cache per-group work by it)."""
        signature = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if signature != self._groups_seen:
            self._group_index = {id(p): g for g in self.param_groups for p in g["params"]}
            self._groups_seen = signature
            self.groups_version += 1
        return self.groups_version

    def group_of(self, name: str) -> dict:
        """The param group of parameter `name` (as of the last `sync_groups`, run by every step)."""
        if self._groups_seen is None:
            self.sync_groups()
        group = self._group_index.get(id(self.named[name]))
        if group is None:  # taken out of every group after gnfx.compile (DARTS' α, for an optimizer of its own)
            raise ConfigError(f"parameter {name!r} is in no param group of the compiled model's optimizer: gnfx "
                              f"steps every parameter it planned at compile time. To train it with an optimizer of "
                              f"its own (DARTS' architecture weights α with Adam), keep it out of gnfx's steps "
                              f"with a group of lr 0: model.optimizer.add_param_group({{'params': [p], 'lr': 0.0}}); "
                              f"or set requires_grad=False before gnfx.compile to leave it fixed")
        return group

    def replace(self, params: dict) -> None:
        """The same parameters as other Parameter objects `params` (by name: FSDP2's sharded ones),
        in the param groups too; the state, which only the unsharded parameters had, is cleared."""
        self.state.clear()
        renamed = {id(self.named[n]): p for n, p in params.items()}
        for g in self.param_groups:
            g["params"] = [renamed[id(p)] for p in g["params"]]
        self.named = dict(params)
        self._groups_seen = None
