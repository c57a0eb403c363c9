"""First contact with PyTorch Geometric's graph neural networks, called as their users train them.

    PYTHONPATH=<torch_geometric>:<its deps>:. OMP_NUM_THREADS=1 python -m benchmarks.pyg_probe \
        [--models GCN gat_net gin_pool] [--optimizers kfac_lr kfac shampoo auto] [--steps 40] [--timeout 400] \
        [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode)
for torch_geometric's models on random graphs, called `model(data.x, data.edge_index)` as PyG's examples
call them (edge_index an integer tensor whose length varies from graph to graph):

- node classification on one graph of 200 nodes, 800 edges, 16 features and 5 classes, the loss on half
  the nodes, `F.cross_entropy(out[train_mask], y[train_mask])` (the other rows' gradient is exactly zero:
  they drop out of N and M, docs/design.md §1): torch_geometric.nn.models' GCN, GraphSAGE, GAT and GIN
  `(in_channels, hidden_channels, num_layers=2, out_channels)`, and modules written as PyG's examples write
  them (`gcn_net`: two GCNConv, ReLU and dropout; `gat_net`: GATConv with 8 heads of dropout 0.6, ELU, a
  one-head GATConv; `sage_net`: two SAGEConv);
- graph classification over a DataLoader of torch_geometric.datasets.FakeDataset (64 graphs of about 20
  nodes, batches of 16: each batch's node and edge counts differ), `model(data.x, data.edge_index,
  data.batch)` pooled by `global_mean_pool` (`gcn_pool`: GCNConv, Linear head) or `global_add_pool`
  (`gin_pool`: GINConv over an MLP, as PyG's GIN examples).

Optimizers: "kfac_lr" (kfac at lr 1e-2), "kfac" (its defaults: the quadratic-model step), "shampoo" and
"auto" at lr 1e-2, all with loss="cross_entropy", and for reference torch.optim.AdamW at lr 1e-2 ("adamw"). Per run: the capture's form, the share of the trainable
parameters in curvature blocks, exactness (float64, the same dropout masks, the compiled model beside the module on
three graphs of different sizes: the largest difference of the loss and of any gradient, and for K-FAC
(with fisher="empirical", the training loss's gradient) the largest relative difference of A and S of the blocks that are a module's linear map against forward
and tensor hooks on that module: A = mean over its input rows of ā āᵀ, S = M Σ g gᵀ, M the rows the loss
counts), the losses of `--steps` steps (first, every tenth, last; for graph
classification the mean loss of each pass over the loader, every tenth pass and the last), gnfx's warnings (once each), the
seconds; or the error. torch_geometric is not a dependency of gnfx.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import probe_main
from benchmarks.hooked_calls import hooked_calls

FEATURES, CLASSES, HIDDEN = 16, 5, 32
GRAPHS, BATCH = 64, 16
EPOCH = GRAPHS // BATCH  # batches per pass over the graph classification loader
NODE_MODELS = ("GCN", "GraphSAGE", "GAT", "GIN", "gcn_net", "gat_net", "sage_net")
GRAPH_MODELS = ("gcn_pool", "gin_pool")
OPTIMIZERS = {"kfac_lr": ("kfac", {"lr": 1e-2}), "kfac": ("kfac", {}), "shampoo": ("shampoo", {"lr": 1e-2}),
              "auto": ("auto", {"lr": 1e-2}), "adamw": ("adamw", {"lr": 1e-2})}  # adamw: torch.optim's, the reference


def torch_geometric_or_exit():
    """torch_geometric, or exit naming how to make it importable."""
    try:
        import torch_geometric
    except ImportError as exc:
        raise SystemExit(f"benchmarks.pyg_probe needs torch_geometric ({exc}): unpack its wheel without "
                         f"dependencies and put it and its small pure-Python dependencies (xxhash, requests) on "
                         f"PYTHONPATH; torch_scatter and torch_sparse are not needed") from exc
    return torch_geometric


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights."""
    pyg = torch_geometric_or_exit()
    conv = pyg.nn
    if name in ("GCN", "GraphSAGE", "GAT", "GIN"):
        return getattr(pyg.nn.models, name)(FEATURES, HIDDEN, 2, CLASSES)

    class GCNNet(nn.Module):  # PyG's examples/gcn.py
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv.GCNConv(FEATURES, HIDDEN), conv.GCNConv(HIDDEN, CLASSES)

        def forward(self, x, edge_index):
            x = F.dropout(x, p=0.5, training=self.training)
            x = self.conv1(x, edge_index).relu()
            x = F.dropout(x, p=0.5, training=self.training)
            return self.conv2(x, edge_index)

    class GATNet(nn.Module):  # PyG's examples/gat.py
        def __init__(self, heads=8):
            super().__init__()
            self.conv1 = conv.GATConv(FEATURES, 8, heads, dropout=0.6)
            self.conv2 = conv.GATConv(8 * heads, CLASSES, heads=1, concat=False, dropout=0.6)

        def forward(self, x, edge_index):
            x = F.dropout(x, p=0.6, training=self.training)
            x = F.elu(self.conv1(x, edge_index))
            x = F.dropout(x, p=0.6, training=self.training)
            return self.conv2(x, edge_index)

    class SAGENet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv.SAGEConv(FEATURES, HIDDEN), conv.SAGEConv(HIDDEN, CLASSES)

        def forward(self, x, edge_index):
            return self.conv2(self.conv1(x, edge_index).relu(), edge_index)

    class GCNPool(nn.Module):  # PyG's graph classification tutorial
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv.GCNConv(FEATURES, HIDDEN), conv.GCNConv(HIDDEN, HIDDEN)
            self.lin = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x, edge_index, batch):
            x = self.conv2(self.conv1(x, edge_index).relu(), edge_index)
            x = conv.global_mean_pool(x, batch)
            return self.lin(F.dropout(x, p=0.5, training=self.training))

    class GINPool(nn.Module):  # PyG's examples/mutag_gin.py
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(conv.GINConv(conv.MLP([d, HIDDEN, HIDDEN])) for d in (FEATURES, HIDDEN))
            self.mlp = conv.MLP([HIDDEN, HIDDEN, CLASSES], norm=None, dropout=0.5)

        def forward(self, x, edge_index, batch):
            for layer in self.convs:
                x = layer(x, edge_index).relu()
            return self.mlp(conv.global_add_pool(x, batch))

    return {"gcn_net": GCNNet, "gat_net": GATNet, "sage_net": SAGENet, "gcn_pool": GCNPool, "gin_pool": GINPool}[name]()


def node_graph(nodes: int, edges: int, seed: int, dtype=torch.float32) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """A random graph's call (x, edge_index), its labels and its training mask (half the nodes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, FEATURES, generator=g, dtype=dtype)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    return (x, edge_index), torch.randint(0, CLASSES, (nodes,), generator=g), torch.rand(nodes, generator=g) < 0.5


def graph_batches(dtype=torch.float32):
    """An endless iterator over DataLoader batches of FakeDataset: ((x, edge_index, batch), y, None)."""
    pyg = torch_geometric_or_exit()
    torch.manual_seed(0)
    dataset = pyg.datasets.FakeDataset(num_graphs=GRAPHS, avg_num_nodes=20, num_channels=FEATURES,
                                       num_classes=CLASSES, task="graph")
    loader = pyg.loader.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    while True:
        for data in loader:
            yield (data.x.to(dtype), data.edge_index, data.batch), data.y, None


def batches(name: str, dtype=torch.float32):
    """The training calls of `name`: one graph again and again (node classification), or the loader's."""
    if name in GRAPH_MODELS:
        yield from graph_batches(dtype)
    while True:
        yield node_graph(200, 800, 0, dtype)


def masked_loss(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean cross-entropy over the training rows (all rows without a mask)."""
    return F.cross_entropy(out, y) if mask is None else F.cross_entropy(out[mask], y[mask])


def hooked_factors(module: nn.Module, names: list[str], call: tuple, y, mask) -> tuple[torch.Tensor, dict]:
    """The loss of `module` on the call and the K-FAC factors of its submodules `names` from forward and tensor
    hooks (module doc), with its parameters' gradients."""
    modules = dict(module.named_modules())
    with hooked_calls(module, names) as records:
        loss = masked_loss(module(*call), y, mask)
        loss.backward()
    rows = len(y) if mask is None else int(mask.sum())
    factors = {}
    for n, calls in records.items():
        bias = getattr(modules[n], "bias", None) is not None
        a = torch.cat([torch.cat([a, torch.ones_like(a[:, :1])], 1) if bias else a for a, _ in calls])
        g = torch.cat([g for _, g in calls])
        factors[n] = {"A": a.T @ a / len(a), "S": rows * g.T @ g}
    return loss, factors


def exactness(name: str, optimizer: str, hparams: dict) -> str:
    """The compiled float64 model beside the module on three graphs (module doc): 'loss Δ, grad Δ[, A/S Δ]'."""
    torch.manual_seed(0)
    model = build(name).double()
    reference = copy.deepcopy(model)
    fisher = {"fisher": "empirical"} if optimizer == "kfac" else {}  # S of the training loss's gradient
    c = gnfx.compile(model, optimizer, loss="cross_entropy", stat_every=1, stat_decay=0.0, **fisher, **hparams)
    calls = (list(zip(range(3), graph_batches(torch.float64))) if name in GRAPH_MODELS else
             [(i, node_graph(n, e, i, torch.float64)) for i, (n, e) in enumerate(((200, 800), (150, 500), (230, 1000)))])
    loss_delta = grad_delta = factor_delta = 0.0
    for i, (call, y, mask) in calls:
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        torch.manual_seed(i)  # the same dropout masks in both
        loss = masked_loss(c(*call), y, mask)
        loss.backward()
        modules = dict(reference.named_modules())
        linear = [b.name for b in c.layers.blocks if b.kind == "linear" and hasattr(modules.get(b.name), "weight")]
        torch.manual_seed(i)
        expected, factors = hooked_factors(reference, linear, call, y, mask)
        loss_delta = max(loss_delta, (loss - expected).abs().item())
        grad_delta = max([grad_delta] + [(p.grad - q.grad).abs().max().item()
                                          for p, q in zip(model.parameters(), reference.parameters()) if p.grad is not None])
        c.step()
        c.zero_grad()
        for block, expected_factors in factors.items():
            stats = c.statistics(block) if optimizer == "kfac" else {}
            for key in ("A", "S"):
                if key in stats:
                    ref = expected_factors[key]
                    factor_delta = max(factor_delta, ((stats[key] - ref).abs().max() / ref.abs().max()).item())
    return f"{loss_delta:.0e}, {grad_delta:.0e}" + (f", {factor_delta:.0e}" if optimizer == "kfac" else "")


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name`."""
    kind, hparams = OPTIMIZERS[optimizer]
    start, losses = time.time(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = "–" if kind == "adamw" else exactness(name, kind, hparams)
        torch.manual_seed(0)
        model = build(name).train()
        if kind == "adamw":
            c, step = model, torch.optim.AdamW(model.parameters(), **hparams)
        else:
            c = step = gnfx.compile(model, kind, loss="cross_entropy", **hparams)
        for _, (call, y, mask) in zip(range(steps), batches(name)):
            loss = masked_loss(c(*call), y, mask)
            loss.backward()
            step.step()
            step.zero_grad()
            losses.append(loss.item())
    if kind == "adamw":
        form = blocks = "–"
    else:
        covered, total = c.layers.coverage(dict(model.named_parameters()))
        form, blocks = c.layers.form, f"{100 * covered / total:.1f}%"
    if name in GRAPH_MODELS:  # the mean over each pass over the loader
        losses = [sum(losses[i:i + EPOCH]) / len(losses[i:i + EPOCH]) for i in range(0, len(losses), EPOCH)]
    shown = [f"{loss:.3g}" for i, loss in enumerate(losses) if i % 10 == 0 or i == len(losses) - 1]
    said = sorted({str(w.message)[:120].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return (f"| {name} | {optimizer} | {form} | {blocks} | {exact} | {', '.join(shown)} | "
            f"{'; '.join(said) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.pyg_probe", probe, {"models": NODE_MODELS + GRAPH_MODELS,
                                                       "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad, A/S | losses | gnfx's warnings | s |",
                "|---|---|---|---|---|---|---|---|"], steps=40, timeout=400)


if __name__ == "__main__":
    main()
