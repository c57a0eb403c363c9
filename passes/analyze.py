"""analyze: a captured GraphModule -> LayerTable.

Each registered layer kind's detector (gnfx.layouts.registration; the built-in kinds are registered
below) finds the call sites of that kind. Sites that share a weight form one block (tied weights).
Then every use of every trainable parameter is accounted for: a parameter is in a block only if
*all* its uses are claimed by that block's sites; otherwise it falls back to the diagonal
preconditioner, and the reason names the other use.

A weight-normed layer (W = g · v / ‖v‖, gnfx.reparametrization) is a block of its layer's kind: its
weight-norm node (passes/weight_norm.py) stands for v, W's shape, wherever a detector asks which
parameter a weight operand is, the node's users are v's uses, and the block holds g as well
(`Block.reparametrization`). Likewise a spectrally normalized one (W = W_o / σ, passes/spectral_norm.py):
its `_SpectralNorm` call stands for W_o; and a weight-standardized one (W_r = (V_r − μ_r) / s_r,
passes/weight_standardization.py): the node computing W stands for V, and a gain g multiplying its rows
(W_r = c g_r Ŵ_r, timm's ScaledStdConv2d) is held like weight norm's g; and a masked one (W = M ⊙ V, M a
constant: MADE's and the autoregressive flows' masked linear layers, passes/masked_weights.py): the product
stands for V. A linear layer's weight scaled by a number, W = s · V (e3nn's FullyConnectedNet), is a block
over V itself: `z = W a = V (s a)`, so its input rows are s a (`options["input_scale"]`,
gnfx.layouts.linear) and every preconditioner steps V as it steps any parameter (the diagonal is AdamW on
V). A parameter moved or cast to a
floating dtype (`W.to(x.device)`) is read through the cast (passes/parameter_casts.py).

A linear weight read in both orientations, `W a` and `Wᵀ h` (a tied autoencoder's decoder), is one block of
its first use's orientation in the same way (the transposed use a guest, its bias left to the fallback).

Tied input/output embeddings (one (V, d) weight read by an embedding and by a linear
unembedding `h Wᵀ`; in general, by sites of a kind whose layout is a `tied_guest` and of one kind
whose layout is a `tied_host`, gnfx.layouts.base) form one block of the host's kind, in its
orientation; the guest's gradient is preconditioned with that block's factors, and its own
statistics (which live in the transposed orientation) are not added to them. A limit of that
choice: under a softmax the head's S = E[δ δᵀ] has the all-ones vector in its null space (Σ_c δ_c = 0),
where the head's gradient has no component but the embedding's has one (a common shift of every
token's embedding), which (S + λ_S I)⁻¹ multiplies by 1/λ_S; on the char GPT of benchmarks/ that part
of the direction sets the quadratic step's α (benchmarks/results/defaults.md, "kfac on the char GPT").
Adding the guest's own K-FAC term `F ⊗ S_e` (token frequencies, output-gradient covariance at the
lookup), as one Kronecker product of the sum or as the exact two-term inverse, removes most of that part of
the direction but took no fewer steps there (same file, "the tied embedding's own curvature"), so
the guest's statistics stay uncollected.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from gnfx.errors import GnfxError
from gnfx.layer_table import Block, Fallback, LayerTable
from gnfx.layouts import KINDS, register_layer_kind
from gnfx.layouts.bilinear import BilinearLayout
from gnfx.layouts.conv import ConvLayout
from gnfx.layouts.conv_transpose import ConvTransposeLayout
from gnfx.layouts.embedding import EmbeddingLayout
from gnfx.layouts.experts import ExpertsLayout
from gnfx.layouts.stacked import StackedLayout
from gnfx.layouts.linear import LinearLayout
from gnfx.layouts.norm import NormLayout
from gnfx.passes.capture import UNUSED
from gnfx.layouts.position import PositionLayout
from gnfx.layouts.scale import ScaleLayout
from gnfx.layouts.shift import ShiftLayout
from gnfx.layouts.weighted_sum import WeightedSumLayout
from gnfx.reparametrization import (MaskedWeight, SampledWeight, ScaledWeight, SpectralNorm, UnitNormWeight,
                                     WeightNorm, WeightStandardization)

from .attention import mark_attention
from .bilinear import find_bilinear_sites
from .boundary import mark_boundary
from .grad_modes import NO_GRADIENT, nodes_without_gradients
from .conv import find_conv_sites
from .conv_transpose import find_conv_transpose_sites
from .embedding import find_embedding_sites
from .grouped_products import find_expert_sites
from .hidden_product import find_hidden_product_sites
from .linear import find_linear_sites
from .norm import find_norm_sites
from .parameter_casts import read_through_casts
from .position import find_position_sites
from .scale import find_scale_sites
from .shift import find_shift_sites
from .sites import Site
from .stacked_products import find_stacked_sites
from .masked_weights import find_masked_weights
from .own_terms import drop_own_terms
from .sampled_weights import find_sampled_weights
from .spectral_norm import find_spectral_norms
from .unit_norm_weights import find_unit_norm_weights
from .weight_norm import find_weight_norms
from .weight_standardization import find_weight_standardizations
from .weighted_sum import find_weighted_sum_sites

# the built-in layer kinds, registered as a user's are (gnfx.register_layer_kind); a vector added to
# activations first: any kind that reads the sum as part of its layer takes it (passes/shift.py)
register_layer_kind("shift", ShiftLayout, find_shift_sites)
register_layer_kind("linear", LinearLayout, find_linear_sites)
register_layer_kind("conv", ConvLayout, find_conv_sites)
register_layer_kind("conv_transpose", ConvTransposeLayout, find_conv_transpose_sites)
register_layer_kind("embedding", EmbeddingLayout, find_embedding_sites)
register_layer_kind("norm", NormLayout, find_norm_sites)
register_layer_kind("position", PositionLayout, find_position_sites)
# a layer scale x ⊙ γ: the norm kind's per-feature scalar layers with x̂ = x (passes/norm.py keeps γ ⊙ x̂)
register_layer_kind("scale", ScaleLayout, find_scale_sites)
# a weighted sum (x * w).sum(-1): per group a linear map to one output; takes the product from the scale kind
register_layer_kind("weighted_sum", WeightedSumLayout, find_weighted_sum_sites)
# a recurrent layer's hidden products W_hh h_{t-1}: linear maps over rows (example, time) (gnfx.recurrent)
register_layer_kind("recurrent", LinearLayout, find_hidden_product_sites)
register_layer_kind("experts", ExpertsLayout, find_expert_sites)
# a bilinear map x1ᵀ W_k x2: the linear map W.flatten(1) of the outer product vec(x1 x2ᵀ)
register_layer_kind("bilinear", BilinearLayout, find_bilinear_sites)
# an ensemble's members in one product of a stacked weight, every row through every member
register_layer_kind("stacked", StackedLayout, find_stacked_sites)

def _block_name(weight: str) -> str:
    """The dotted module path of a layer's `.weight` (`attn.in_proj` for `attn.in_proj_weight`);
    the parameter's own name otherwise."""
    path, _, leaf = weight.rpartition(".")
    if leaf == "weight" and path:
        return path
    return weight[: -len("_weight")] if leaf.endswith("_weight") and leaf != "_weight" else weight


class _ParamIndex:
    """Maps graph nodes and module paths to the canonical parameter names of the original model."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        self.gm = gm
        # node computing W -> how (`_reparametrize`)
        self.reparametrized: dict[fx.Node, WeightNorm | SpectralNorm | WeightStandardization | MaskedWeight
                                  | UnitNormWeight | ScaledWeight | SampledWeight] = {}
        # node casting or moving a parameter -> its name (`_uses`, passes/parameter_casts.py)
        self.casts: dict[fx.Node, str] = {}

    def param_of(self, node) -> str | None:
        """The canonical name of the trainable parameter a `get_attr` node reads (or of a Parameter
        itself: those of a `call_module`; or v, for a weight-norm node computing W from it; or the
        parameter a cast node casts), else None."""
        if isinstance(node, fx.Node) and node in self.reparametrized:
            return self.reparametrized[node].standin
        if isinstance(node, fx.Node) and node in self.casts:
            return self.casts[node]
        name = self._name_of(node)
        return name if name is not None and self.params[name].requires_grad else None

    def frozen_of(self, node) -> tuple[str, nn.Parameter] | None:
        """(name, parameter) of the frozen (requires_grad=False) parameter a `get_attr` node reads, else None."""
        name = self._name_of(node)
        return (name, self.params[name]) if name is not None and not self.params[name].requires_grad else None

    def _name_of(self, node) -> str | None:
        """The canonical name of the parameter (trainable or not) a `get_attr` node reads, or of a Parameter."""
        if isinstance(node, nn.Parameter):
            obj = node
        elif not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        else:
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
        return self.names.get(id(obj))

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)



def _uses(gm: fx.GraphModule, index: _ParamIndex) -> dict[str, list[tuple]]:
    """Each trainable parameter's uses: (node that consumes it, get_attr node, or the cast of it the
    consumer reads, or None); the casts recorded in `index.casts`; a read of its metadata alone
    (passes/parameter_casts.py METADATA_READS, METADATA_ATTRIBUTES) is none, nor, beside another use, a
    term of its own the forward returns (passes/own_terms.py)."""
    uses: dict[str, list[tuple]] = {n: [] for n, p in index.params.items() if p.requires_grad}
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            name = index.param_of(node)
            if name is not None:
                uses[name].extend(read_through_casts(node, index.casts, name))
        elif node.op == "call_module":
            for _, p in modules[node.target].named_parameters():
                name = index.names.get(id(p))
                if name in uses:
                    uses[name].append((node, None))
    drop_own_terms(gm, uses)  # a KL of the parameters returned beside the output (passes/own_terms.py)
    return uses


def _reparametrize(gm: fx.GraphModule, index: _ParamIndex, uses: dict[str, list[tuple]]) -> dict[str, object]:
    """Make each weight-norm node whose g and v only it uses (passes/weight_norm.py) stand for v (its
    `standin`): the node's users become the uses of v, and of g (`held`: a block over W claims both,
    else both fall back for what uses W); each spectral-norm call (passes/spectral_norm.py) stand for
    W_o; each weight standardization's W (passes/weight_standardization.py) stand for V (holding its gain,
    where it has one); each masked weight M ⊙ V (passes/masked_weights.py) stand for V; each sampled weight
    μ + P (passes/sampled_weights.py) stand for μ. Returns the stand-in's name -> its reparametrization."""
    index.reparametrized = {**find_weight_norms(gm, index.param_of, index.frozen_of, uses),
                            **find_spectral_norms(gm, index.param_of, index.shape_of, uses),
                            **find_weight_standardizations(gm, index.param_of, index.shape_of, uses),
                            **find_masked_weights(gm, index.param_of, index.shape_of, uses),
                            **find_sampled_weights(gm, index.param_of, index.shape_of, uses),
                            **find_unit_norm_weights(gm, index.param_of, index.shape_of, uses)}
    by_standin: dict[str, object] = {}
    for name in {rp.standin for rp in index.reparametrized.values()}:
        uses[name] = []
    for node, rp in index.reparametrized.items():
        uses[rp.standin].extend((user, node) for user in node.users)
        by_standin[rp.standin] = rp
    for rp in by_standin.values():
        for name in rp.held:
            uses[name] = list(uses[rp.standin])
    return by_standin


def _read_without_gradient(node: fx.Node) -> str:
    return f"{NO_GRADIENT} (node {node.name}), where it gets no gradient: no curvature to model there"


def _describe_use(node: fx.Node, leaves: dict[str, str], rejected: dict) -> str:
    if node in rejected:
        return f"{rejected[node]} at node {node.name}"
    if "gnfx_fallback_reason" in node.meta:  # a pass said why it left this node alone
        return f"{node.meta['gnfx_fallback_reason']} (node {node.name})"
    if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled and node.args and node.args[0] is False:
        # torch.export's form of a `with torch.no_grad():` region (LayoutLMv3's relative position tables)
        return _read_without_gradient(node)
    if node.op == "call_module":
        why = leaves.get(node.target)
        return (f"inside leaf module {node.target!r} ({why})" if why
                else f"inside module {node.target!r}, a layer kind gnfx has no curvature block for")
    target = getattr(node.target, "__name__", str(node.target))
    return f"used by {node.op} {target!r} (node {node.name}), not a layer gnfx models"


def _detect(kind, gm: fx.GraphModule, index: _ParamIndex) -> tuple[list[Site], list]:
    """The sites of one registered layer kind (each marked with its name) and its rejected nodes."""
    found, rejected = kind.detector(gm, index.param_of, index.shape_of)
    for site in found:
        if not isinstance(site, Site):
            raise GnfxError(f"the detector of layer kind {kind.name!r} returned {site!r} as a site; a detector "
                            f"returns (sites, rejected) with gnfx.passes.sites.Site sites")
        site.kind = kind.name
    return found, rejected


def _geometry(site: Site) -> tuple:
    return site.d_in, site.d_out, str(site.options)


def _tied(group: list[Site]) -> tuple[list[Site], str] | None:
    """(the sites that form the block, what the others are) of a tied input/output embedding: the sites
    of the one kind whose layout is a `tied_host`, the others all of one kind whose layout is a
    `tied_guest` (gnfx.layouts.base); of a linear weight read in both orientations (a tied autoencoder's
    encoder `W a` and decoder `Wᵀ h`): the sites in the orientation of the first, the others all of one
    geometry, its transpose; None for any other group."""
    if {s.kind for s in group} == {"linear"}:
        host = [s for s in group if _geometry(s) == _geometry(group[0])]
        others = {_geometry(s) for s in group if _geometry(s) != _geometry(group[0])}
        if len(others) == 1 and next(iter(others))[:2] == (group[0].d_out, group[0].d_in) and all(
                s.options.get("transposed", False) != group[0].options.get("transposed", False)
                for s in group if s not in host):
            return host, "linear, transposed"
        return None
    layouts = {s.kind: KINDS[s.kind].layout for s in group}
    hosts = [k for k, layout in layouts.items() if layout.tied_host]
    guests = [k for k, layout in layouts.items() if layout.tied_guest and not layout.tied_host]
    if len(layouts) != 2 or len(hosts) != 1 or len(guests) != 1:
        return None
    return [s for s in group if layouts[s.kind].tied_host], guests[0]


def _block(weight: str, group: list[Site], bias: str | None, reparametrization) -> Block:
    first = group[0]
    name = _block_name(weight if reparametrization is None else reparametrization.weight)
    options = dict(first.options)
    if isinstance(reparametrization, ScaledWeight):  # V on the rows s a (module docstring)
        options["input_scale"], reparametrization = reparametrization.factor, None
    if isinstance(reparametrization, SampledWeight):  # μ itself: ∂W/∂μ = I (gnfx.reparametrization)
        reparametrization = None
    return Block(name=name, kind=first.kind, weight=weight, bias=bias, d_in=first.d_in,
                 d_out=first.d_out, sites=[s.node.name for s in group], options=options,
                 reparametrization=reparametrization)


def analyze(model: nn.Module, gm: fx.GraphModule, leaves: dict[str, str], form: str):
    """Build the LayerTable of `gm` (captured from `model`); returns it and the sites of each block
    (the sites whose statistics the taps collect)."""
    index = _ParamIndex(model, gm)
    uses = _uses(gm, index)
    reparametrized = _reparametrize(gm, index, uses)
    # the reads under the forward's torch.no_grad() (passes/grad_modes.py) give no gradient: no sites, no uses
    without = nodes_without_gradients(gm)
    read_without = {name: next(u for u, _ in param_uses if u in without) for name, param_uses in uses.items()
                    if param_uses and all(u in without for u, _ in param_uses)}
    uses = {name: [(u, a) for u, a in param_uses if u not in without] for name, param_uses in uses.items()}
    sites: list[Site] = []
    rejected: dict[fx.Node, str] = {}
    for kind in KINDS.values():  # in registration order: the built-in kinds first
        found, bad = _detect(kind, gm, index)
        # a later kind takes the nodes and the parameter uses it claims from the earlier ones
        taken, taken_uses = {s.node for s in found}, {u for s in found for u in s.uses}
        sites = [s for s in sites if s.node not in taken and taken_uses.isdisjoint(s.uses)] + found
        rejected.update(bad)
    sites = [s for s in sites if s.node not in without]

    by_weight: dict[str, list[Site]] = {}
    for s in sites:
        by_weight.setdefault(s.weight, []).append(s)

    blocks, block_sites, claimed, notes, guest_biases = [], {}, set(), {}, {}
    for weight, group in by_weight.items():
        tapped, tie = group, _tied(group)
        if tie is not None:  # tied input/output embedding, or a linear weight read transposed too
            tapped = tie[0]
            guest_biases.update({s.bias: weight for s in group if s not in tapped and s.bias is not None})
            notes[weight] = f"tied with a site of kind {tie[1]!r}, whose gradient shares this block's factors"
        elif len({s.kind for s in group}) > 1 or len({_geometry(s) for s in group}) > 1:
            continue  # reported below: the uses stay unclaimed
        group_uses = {u for s in group for u in s.uses}
        if any((u, a) not in group_uses for u, a in uses[weight]):
            continue
        biases = {s.bias for s in tapped}
        bias = biases.pop() if len(biases) == 1 else None
        if bias is not None and any((u, a) not in group_uses for u, a in uses[bias]):
            bias = None
        block = _block(weight, tapped, bias, reparametrized.get(weight))
        blocks.append(block)
        block_sites[block.name] = tapped
        claimed.update(block.held_params)

    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    blocks.sort(key=lambda b: order[block_sites[b.name][0].node])
    mark_attention(gm, blocks, block_sites)
    mark_boundary(gm, blocks, block_sites)
    fallbacks = []
    for name, param_uses in uses.items():
        if name in claimed:
            continue
        in_sites = {u for s in sites for u in s.uses}
        other = [u for u, a in param_uses if (u, a) not in in_sites]
        owners = {s.weight for s in sites if s.bias == name}
        if name in read_without:
            reason = _read_without_gradient(read_without[name])
        elif not param_uses:
            reason = UNUSED
        elif other:
            reason = _describe_use(other[0], leaves, rejected)
        elif name in guest_biases and guest_biases[name] in claimed:
            reason = f"bias of a tied use of {guest_biases[name]!r}, whose block holds the bias of its own use"
        elif owners - claimed:
            reason = f"bias of {sorted(owners - claimed)[0]!r}, which is not in a curvature block"
        elif owners:
            reason = "bias shared by layers with different biases"
        else:
            reason = "used by layers of different kinds or shapes"
        fallbacks.append(Fallback(param=name, shape=index.shape_of(name), reason=reason))
    return LayerTable(blocks, fallbacks, leaves, form, notes), block_sites
