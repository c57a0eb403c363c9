"""Inspect what gnfx's compiler did: the block table, the rewritten forward, the generated step,
the statistics, the cost, and the graph as DOT (rendered to PNG when Graphviz's `dot` is installed).

    python examples/inspect_graph.py [--out gnfx_graph.dot]
"""
import argparse
import os
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gnfx_graph.dot")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = gnfx.compile(Net(), optimizer="kfac", stat_every=1)
    x, y = torch.randn(32, 16), torch.randint(4, (32,))
    F.cross_entropy(model(x), y).backward()
    model.step()

    print(model)                                    # blocks, factor shapes, preconditioner, state, why
    print("\nfallbacks:", [(f.param, f.reason) for f in model.layers.fallbacks])
    print("\nrewritten forward (taps around every block):\n" + model.graph_module.code)
    print("generated update step:\n" + model.update_code)
    print("\nstatistics of fc1:", {k: tuple(v.shape) for k, v in model.statistics("fc1").items()})
    print("\ncost:\n" + str(model.cost()))
    graph = model.to_networkx()
    print(f"\nnetworkx graph: {graph.number_of_nodes()} nodes, "
          f"{sum(r == 'tap' for _, r in graph.nodes(data='role'))} taps")
    with open(args.out, "w") as f:
        f.write(model.to_dot())
    print(f"wrote {args.out}")
    if shutil.which("dot"):
        png = os.path.splitext(args.out)[0] + ".png"
        subprocess.run(["dot", "-Tpng", args.out, "-o", png], check=True)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
