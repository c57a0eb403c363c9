"""kfac's quadratic step block by block, on a model of benchmarks.points_probe (a diagnosis, not a probe row):

    PYTHONPATH=[<pointnet, einops>:]. OMP_NUM_THREADS=1 python -m benchmarks.kfac_block_shares MODEL STEPS AT [HPARAMS]

MODEL a name of points_probe.build, STEPS the training steps (points_probe's task, batches and order), AT the steps
(comma-separated; 0: none) whose quadratic step is taken apart, HPARAMS a JSON dict of gnfx.compile's keywords
("optimizer" replaces "kfac"). At each step in AT, with Δ the K-FAC proposal (the first row of the quadratic model's
V) and Δ_b its restriction to block b (zero elsewhere), the model's M_bb' = Δ_bᵀ(G + λI)Δ_b' (G the exact GGN, by
the step's own jvp rows and output Hessian) and b_b = gᵀΔ_b: per block its rows per call on a plain forward of 16
examples (a copy under hooks), its A and S sides, ‖Δ_b‖, Qdiag = M_bb / ΣM, Qrow = Σ_b' M_bb' / ΣM (its share of
Δᵀ(G+λI)Δ, cross terms split evenly), gΔ = b_b / Σb, and α_b* = -b_b / M_bb (the step along Δ_b alone); the
blocks whose rows are fewer than A's side ("few-row") against the rest: their shares and α* of each part alone;
"diag-sum share" Σ_b M_bb / ΣM (1: the blocks' output changes uncorrelated). Then the steps until the mean of the
last 10 batch losses reaches the model's target. Taking a step apart runs extra forwards, which moves the
training a little (pointnet_seg: 34 steps plain, 51 taken apart at 4 steps); steps to target come from AT = 0.
SEED=s (environment): the initial weights' seed (0). SEEN_DAMPING=h (environment): factored damping with each
factor's mean eigenvalue taken over the dimensions its rows can span, tr F / min(d, rows·h), instead of tr F / d
(an experiment: benchmarks/results/first_contact_14_tnet.md).
Results: benchmarks/results/first_contact_14_tnet.md.
"""
import copy
import json
import os
import sys

import torch
from torch import nn

import gnfx
from gnfx import quadratic_step as qs
from benchmarks import points_probe as pp


def main() -> None:
    name = sys.argv[1]; steps = int(sys.argv[2]); at = {int(s) for s in sys.argv[3].split(",")}
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    torch.set_num_threads(1)
    torch.manual_seed(int(os.environ.get("SEED", 0)))  # the initial weights (and dropout's masks)
    model = pp.build(name).train()
    x, y = pp.task(name)
    # rows per call of each Linear / k=1 conv on a plain forward (batch 16)
    rows = {}
    def hook(mod_name):
        def h(m, inp, out):
            a = inp[0]
            rows[mod_name] = a.numel() // (m.in_features if isinstance(m, nn.Linear) else m.in_channels)
        return h
    ref = copy.deepcopy(model)
    for n, m in ref.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.register_forward_hook(hook(n))
    with torch.no_grad():
        ref(x[:16])
    if os.environ.get("SEEN_DAMPING"):
        from gnfx.preconditioners import kfac as kf
        horizon = float(os.environ["SEEN_DAMPING"])  # rows per statistic step times this: the rows a factor has seen
        current = {}
        orig_inverses, orig_damping = kf.KFAC._inverses, kf.factored_damping
        def inverses(self, A, S, layout):
            current["block"] = layout.block
            return orig_inverses(self, A, S, layout)
        def damping(mean_a, mean_s, lam):
            blk = current["block"]
            seen = rows.get(blk.name, 10 ** 9) * horizon
            d_a, d_s = blk.d_in + (blk.bias is not None), blk.d_out
            return orig_damping(mean_a * d_a / min(d_a, seen), mean_s * d_s / min(d_s, seen), lam)
        kf.KFAC._inverses, kf.factored_damping = inverses, damping
    c = gnfx.compile(model, extra.pop("optimizer", "kfac"), loss="cross_entropy", **extra)
    record = {"t": 0}
    orig = qs.QuadraticStep._model_terms
    def wrapped(self, V, grads, z, J):
        M, b = orig(self, V, grads, z, J)
        if record["t"] in at:
            layout = self._flat_layout
            blocks = []
            for pre in layout.preconditioners:
                for blk in pre.blocks:
                    blocks.append((blk.name, list(blk.held_params)))
            held = {p for _, ps in blocks for p in ps}
            rest = [n for n in layout.names if n not in held]
            if rest:
                blocks.append(("(no block)", rest))
            offsets, o = {}, 0
            for n, s in zip(layout.names, layout.sizes):
                offsets[n] = (o, o + s); o += s
            delta = V[0]
            rows_b = []
            for _, ps in blocks:
                r = torch.zeros_like(delta)
                for p in ps:
                    a, e = offsets[p]; r[a:e] = delta[a:e]
                rows_b.append(r)
            theta = [p.detach() for p in self.parameters.named.values()]
            zz, JJ = self._output(theta, layout.tangents(rows_b))
            zz, JJ = [t.detach() for t in zz], [t.detach() for t in JJ]
            Mb, bb = orig(self, torch.stack(rows_b), grads, zz, JJ)
            gram = torch.stack(rows_b).double() @ torch.stack(rows_b).double().T
            Mtot, btot = float(Mb.sum()), float(bb.sum())
            print(f"\n== {name} step {record['t']}  λ={self.damping:.3g}  Δᵀ(G+λI)Δ={Mtot:.3g} "
                  f"(single-row M00={float(M[0, 0]):.3g})  gᵀΔ={btot:.3g}  α*(Δ alone)={-btot / Mtot:.3g}")
            rowshare = Mb.sum(1) / Mtot
            few = []
            for i, (bn, ps) in enumerate(blocks):
                w = dict(model.named_parameters()).get(ps[0]) if ps else None
                r = rows.get(bn, None)
                few.append(w is not None and w.dim() > 1 and r is not None and r < w[0].numel() + 1)
            f = torch.tensor(few, dtype=torch.double)
            def part(mask):
                q = float(mask @ Mb @ mask); g_ = float(mask @ bb)
                return q / Mtot, g_ / btot, -g_ / q if q > 0 else float('nan')
            print("blocks with rows < A's side:", [blocks[i][0] for i in range(len(blocks)) if few[i]])
            print("  few-row group: Q share %.3f, gΔ share %.3f, α*_group %.3g | rest: Q share %.3f, gΔ share %.3f, "
                  "α*_rest %.3g | diag-sum share %.3f" % (*part(f), *part(1 - f), float(Mb.diagonal().sum()) / Mtot))
            print(f"{'block':34s} {'rows':>5s} {'A':>5s} {'S':>5s} {'|Δb|':>7s} {'Qdiag':>6s} {'Qrow':>6s} {'gΔ':>6s} "
                  f"{'α_b*':>7s}")
            top = sorted(range(len(blocks)), key=lambda i: -float(rowshare[i]))[:8]
            for i in top:
                bn, ps = blocks[i]
                w = dict(model.named_parameters()).get(ps[0]) if ps else None
                A = (w[0].numel() + (len(ps) > 1)) if w is not None and w.dim() > 1 else "-"
                S = w.shape[0] if w is not None else '-'
                print(f"{bn[:34]:34s} {str(rows.get(bn, '?')):>5s} {str(A):>5s} {str(S):>5s} {float(rows_b[i].norm()):7.3g} "
                      f"{float(Mb[i, i]) / Mtot:6.3f} {float(rowshare[i]):6.3f} {float(bb[i]) / btot:6.3f} "
                      f"{-float(bb[i]) / float(Mb[i, i]):7.3g}")
        return M, b
    qs.QuadraticStep._model_terms = wrapped
    order = torch.randperm(pp.EXAMPLES * steps // pp.BATCH + pp.EXAMPLES,
                           generator=torch.Generator().manual_seed(3)) % pp.EXAMPLES  # points_probe.train's order
    losses = []
    for t in range(steps):
        record["t"] = t + 1
        batch = order[t * pp.BATCH:(t + 1) * pp.BATCH]
        loss = pp.loss_of(name, c(x[batch]), y[batch]); loss.backward(); c.step(); c.zero_grad()
        losses.append(loss.item())
        ls = c.optimizer.last_step
        if (t + 1) in at:
            print(f"step {t + 1}: loss {loss.item():.3f} α={ls.get('alpha', 0):.3g} μ={ls.get('mu', 0):.3g} "
                  f"ρ={ls.get('rho', 0):.3g} λ={ls.get('damping', 0):.3g}")
    means = pp.running_means(losses)
    reached = next((t + 1 for t, m in enumerate(means) if t >= 9 and m <= pp.TARGETS.get(name, 0.5)), None)
    print("steps to target", reached, "final mean", means[-1])


if __name__ == "__main__":
    main()
