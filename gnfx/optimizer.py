"""`GnfxOptimizer`: the torch.optim.Optimizer that runs the plan's preconditioners.

One step: fold the statistics collected on this step into their averages, run the amortized
refresh of each curvature preconditioner when it is due, run the generated update function
(gnfx.codegen) for the curvature preconditioners, and the diagonal preconditioner's foreach step.
Per-group `lr` and `weight_decay` work as in any torch optimizer (LR schedulers included), and
`state_dict()` carries every moment, factor, statistic and counter, so a run resumed from a
checkpoint continues exactly like the uninterrupted one.
"""
from __future__ import annotations

import warnings

import torch

from gnfx.codegen import UpdateFunction
from gnfx.distributed import Communicator
from gnfx.errors import ConfigError
from gnfx.preconditioners.curvature import CurvaturePreconditioner


class GnfxOptimizer(torch.optim.Optimizer):
    def __init__(self, named_params: dict, preconditioner_specs: list, statistics, settings: dict, defaults: dict):
        """`preconditioner_specs` is a list of (class, hparams, blocks, loose parameter names)."""
        self._named = dict(named_params)
        super().__init__(list(self._named.values()), defaults)
        self.statistics = statistics
        self.stat_every = settings["stat_every"]
        self.stat_decay = settings["stat_decay"]
        self.steps = 0
        self.skipped_steps = 0
        self.nan_policy = settings["nan_policy"]
        self._distributed = settings["distributed"]
        self._comm = None
        self.collected = False  # set by the compiled model when a forward ran with taps
        self._groups_seen = None
        self.groups_version = 0
        self.preconditioners = [cls(hp, blocks, params, self) for cls, hp, blocks, params in preconditioner_specs]
        self.curvature = [p for p in self.preconditioners if isinstance(p, CurvaturePreconditioner)]
        self.elementwise = [p for p in self.preconditioners if not isinstance(p, CurvaturePreconditioner)]
        self.update_function = UpdateFunction(self.curvature, self, settings["compile"])

    @property
    def comm(self):
        """The gnfx.distributed.Communicator when running on several processes, else None."""
        if self._comm is None and self._distributed != "off" and Communicator.active():
            self._comm = Communicator(partition_refresh=self._distributed == "partitioned")
        return self._comm

    # --- lookups used by the preconditioners -------------------------------------------------
    def param(self, name: str) -> torch.Tensor:
        return self._named[name]

    def state_of(self, name: str) -> dict:
        return self.state[self._named[name]]

    def sync_groups(self) -> int:
        """Re-index parameter -> param group if the groups changed; returns the groups' version,
        which increases with every change (preconditioners cache per-group work by it)."""
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
        return self._group_index[id(self._named[name])]

    def add_param_group(self, param_group: dict) -> None:
        """A group of the compiled model's own parameters (moved out of their group first, as in
        any torch optimizer); a parameter gnfx did not plan at compile time is refused."""
        if hasattr(self, "_named"):
            known = {id(p) for p in self._named.values()}
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            strangers = [p for p in params if id(p) not in known]
            if strangers:
                raise ConfigError(f"add_param_group got {len(strangers)} parameter(s) that were not trainable "
                                  f"when the model was compiled; gnfx plans every parameter at compile time: "
                                  f"set requires_grad before gnfx.compile, or compile again")
        super().add_param_group(param_group)

    # --- the step ----------------------------------------------------------------------------
    @property
    def statistic_step(self) -> bool:
        """Whether this step collects statistics (taps, and gradient-based curvature)."""
        return self.steps % self.stat_every == 0

    @property
    def collecting(self) -> bool:
        """Whether the forward/backward before the next step runs the taps."""
        return bool(self.statistics) and self.statistic_step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self.statistics.batches() if self.collected else {}
        self.collected = False
        if batches and self.comm is not None:
            batches = self.comm.average_statistics(batches, self.statistics.examples())
        problem = self._non_finite(batches)
        if problem:
            self.statistics.discard()
            self.skipped_steps += 1
            message = (f"gnfx skipped step {self.steps} (no parameter or statistic changed; "
                       f"{self.skipped_steps} skipped so far): {problem}")
            if self.nan_policy == "raise":
                raise FloatingPointError(message + "; nan_policy='raise'")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return loss
        self.statistics.fold(batches, self.stat_decay)
        self.sync_groups()
        for pre in self.curvature:
            if self.statistic_step:
                pre.collect()
            if pre.refresh_due(self.steps):
                pre.refresh()
        self.update_function(self.statistic_step)
        for pre in self.elementwise:
            pre.update()
        self.steps += 1
        return loss

    def _non_finite(self, batches: dict) -> str:
        """'' if every gradient and this step's statistics are finite, else what is not (one
        host synchronization: the norms of all of them, checked at once)."""
        named = [(n, p.grad) for n, p in self._named.items() if p.grad is not None]
        named += [(f"statistic {k} of block {b}", v) for b, batch in batches.items() for k, v in batch.items()]
        if not named:
            return ""
        norms = torch.stack([x.to(torch.float32) for x in torch._foreach_norm([t for _, t in named])])
        finite = torch.isfinite(norms)
        if bool(finite.all()):
            return ""
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        return "non-finite " + ", ".join(("gradient of " + n) if not n.startswith("statistic") else n for n in bad)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["gnfx"] = {"steps": self.steps, "skipped_steps": self.skipped_steps,
                      "statistics": self.statistics.state_dict()}
        return sd

    def load_state_dict(self, state_dict):
        if "gnfx" not in state_dict:
            raise ConfigError("this state_dict was not written by a gnfx optimizer (no 'gnfx' entry)")
        saved = state_dict["state"]
        if len(state_dict["param_groups"]) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(state_dict["param_groups"], self.param_groups)):
            raise ConfigError("the checkpoint's parameter groups do not match this optimizer's: "
                              "was it saved from a model with a different architecture?")
        gnfx_state = state_dict["gnfx"]
        self.statistics.load_state_dict(gnfx_state["statistics"])
        plain = {k: v for k, v in state_dict.items() if k != "gnfx"}
        super().load_state_dict(plain)
        # torch casts floating state to each parameter's dtype; gnfx keeps factors in their own
        # dtype (float32/float64 whatever the model's), so restore the saved tensors as they were.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in saved.get(i, {}).items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.detach().clone().to(p.device)
        self.steps = int(gnfx_state["steps"])
        self.skipped_steps = int(gnfx_state.get("skipped_steps", 0))
