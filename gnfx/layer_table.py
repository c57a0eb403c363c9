"""The LayerTable: the compiler's account of every trainable parameter.

One `Block` per curvature block (a layer whose curvature gnfx models), one `Fallback` per
trainable parameter that no block claims, with the reason. Every trainable parameter of the
model is in exactly one of the two.
"""
from __future__ import annotations

import dataclasses

from gnfx.report import block_table, leaf_lines
from gnfx.layouts import layout_of


@dataclasses.dataclass
class Block:
    """A curvature block: a linear map `z = W a (+ b)` used at one or more call sites.

    `kind` is the name of its registered layer kind ("linear", "conv", "embedding", "norm",
    "position", "scale" or one of gnfx.register_layer_kind; see gnfx.layouts for how each reads as
    `z = W a`). `d_in`, `d_out` are the sizes of `a` and `z` (for a conv, `a` is a patch
    of C_in·prod(k) entries, of one group's C_in/groups channels for a grouped one; for an
    embedding, a one-hot vector over the vocabulary; for a norm, one feature's x̂); with a bias, `a` gets a
    trailing 1 and the factor `A` is (d_in + 1) x (d_in + 1), or its diagonal blocks when it has more
    than `max_factor` entries (gnfx.layouts.base). `sites` are the graph nodes that
    apply the map (more than one for tied weights; their statistics sum as if the sites were
    extra positions). `role` marks attention projections ("attention.q", ".k", ".v", ".qkv",
    ".out"); `model_input` marks a block that reads the model's input (an input layer),
    `model_output` one whose output the model returns (an output layer; passes/boundary.py); `options` holds kind-specific geometry (conv stride/padding/dilation, orientation).
    `reparametrization`: for a weight-normed or spectrally normed layer, the gnfx.reparametrization
    object its weight W is computed by; `weight` is then the parameter of W's shape (v, W_o) whose
    name W's stand-in takes in the step.
    `called_by` names the opaque submodule whose Python code calls the block's layer (an opened child,
    passes/opaque_children.py): each call is a site, any number of them per forward, so its statistics
    treat it as a weight of several sites; None for a block of the captured graph.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    sites: list[str]
    options: dict = dataclasses.field(default_factory=dict)
    role: str | None = None
    reparametrization: object = None
    model_input: bool = False
    model_output: bool = False
    called_by: str | None = None
    # the plan's choices, filled in on the plan's copy of the block (gnfx.plan; None as analyzed):
    # its preconditioner, and the largest factor dimension that keeps whole (None: all whole)
    preconditioner: str | None = None
    max_factor: int | None = None

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names, as in `named_parameters()`: the weight, then the bias if any."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def held_params(self) -> tuple[str, ...]:
        """Every parameter the block accounts for: `params`, and the others a reparametrized weight is
        computed from (the magnitude g of a weight-normed one)."""
        return self.params + (() if self.reparametrization is None else self.reparametrization.held)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the block's factors (its layout's): A over inputs (bias folded in), S over
        outputs; and of its weight."""
        return {**layout_of(self).factor_shapes(),
                "W": tuple(self.options.get("weight_shape", (self.d_out, self.d_in)))}


@dataclasses.dataclass
class Fallback:
    """A trainable parameter that no curvature block claims; it gets the diagonal preconditioner."""

    param: str
    shape: tuple[int, ...]
    reason: str
    preconditioner: str | None = None


class LayerTable:
    """The blocks (iterate over them, or index by name) and the fallback parameters."""

    def __init__(self, blocks: list[Block], fallbacks: list[Fallback], leaves: dict[str, str], form: str,
                 notes: dict[str, str] | None = None, opened: dict[str, str] | None = None):
        self.blocks = blocks
        self.fallbacks = fallbacks
        self.leaves = leaves
        self.form = form
        self.notes = notes or {}  # parameter name -> remark shown in the registration table
        # path of each layer inside an opaque submodule -> whether it was opened, or why not
        # (passes/opaque_children.py)
        self.opened = opened or {}
        self.plan = None  # on the plan's view of a table (gnfx.plan): the Plan, which serves each block and why
        self.capture = form  # how the graph was captured and why (set by gnfx.variants)
        self.reindex()

    def reindex(self) -> None:
        """Index the blocks by name again (after a pass changed the list)."""
        self._by_name = {b.name: b for b in self.blocks}

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, name: str) -> Block:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self._by_name)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        """The block table (as in the model's report, without the state column), the fallback
        parameters with the reason no block claims them, and the opaque submodules."""
        lines = [f"LayerTable: {len(self)} curvature blocks, {len(self.fallbacks)} fallback parameters, "
                 f"graph captured with {self.form}", block_table(self)]
        if self.fallbacks:
            lines += ["", "fallback parameters:"] + [f"  {f.param}: {f.reason}" for f in self.fallbacks]
        return "\n".join(lines + leaf_lines(self))

    def coverage(self, params: dict, opened: bool = True) -> tuple[int, int]:
        """(entries of the trainable parameters in curvature blocks, entries of all trainable
        parameters); `params` maps parameter names to tensors. `opened`: counting the blocks of layers
        opened inside opaque submodules (`Block.called_by`)."""
        in_blocks = sum(params[n].numel() for b in self.blocks for n in b.held_params)
        covered = sum(params[n].numel() for b in self.blocks for n in b.held_params if opened or b.called_by is None)
        return covered, in_blocks + sum(params[f.param].numel() for f in self.fallbacks)

    def block_of(self, param: str) -> Block | None:
        """The block that holds parameter `param`, or None if it falls back."""
        return next((b for b in self.blocks if param in b.held_params), None)
