"""First contact with training tasks beyond supervised classification, written as their users write them.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.task_probe [--tasks gan wgan_gp ...] \
        [--optimizers kfac kfac_loss ...] [--steps 4] [--timeout 300] [--out table.md]

Plain torch, small models, a few steps each, with `gnfx.compile(model, optimizer=X, ...)` put in front of
an otherwise unchanged loop (every model the task trains compiled, each with its own optimizer):

- gan: a generator and a discriminator, D's step on D(cat(real, G(z).detach())) with BCE, G's step through D
  (`bce(D(G(z)), 1)`, which fills D's gradients too; D's zero_grad() before its own backward clears them);
- wgan_gp: a critic with WGAN-GP's penalty, `autograd.grad(D(x̂).sum(), x̂, create_graph=True)`, 2 critic
  steps per generator step;
- r1: the non-saturating GAN with R1 on the real batch (StyleGAN's), one discriminator forward for
  the loss and the penalty;
- distill: a student under KL(softmax(t/T) ‖ softmax(s/T))·T² + CE, T = 2, its teacher compiled too (kfac),
  in eval mode under torch.no_grad;
- mixup: `λ CE(z, y_a) + (1 - λ) CE(z, y_b)` on mixed inputs, label smoothing 0.1;
- actor_critic: a shared trunk with policy logits and a value head, `-logp(a)·A + 0.5 mse(v, R) - 0.01 H`;
- reinforce: a policy alone, `-(logp(a)·(R - mean R)).mean()`;
- fgsm: adversarial training, `autograd.grad(CE, x)` at the clean batch, the step on x + ε sign(∇x);
- maml: a MAML inner step by torch.func.functional_call on the compiled model with fast weights
  θ - α∇θ (create_graph), the outer loss on the query batch;
- freeze: the first layer frozen (requires_grad_(False)) after 2 steps, unfrozen after 4.

Optimizers: "kfac" at lr=0.01; "kfac_loss": kfac at its defaults with the task's loss= where it has a standard
one (mean BCE for gan's and r1's discriminator, cross_entropy for distill, mixup, reinforce, actor_critic,
fgsm, maml, freeze; the models without one at lr=0.01), "ekfac", "rank1", "shampoo", "diag", "auto" at
lr=0.01. Per run: the losses (the trained model's; for the GANs D's then G's), gnfx's warnings (once each),
the seconds; or the error. The statistics these loops record are checked against plain autograd in
tests/test_filled_gradients.py.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gnfx
from benchmarks.child_rows import probe_main

OPTIMIZERS = ("kfac", "kfac_loss", "ekfac", "rank1", "shampoo", "diag", "auto")
LR = 0.01


def mlp(*sizes: int, act=nn.Tanh) -> nn.Sequential:
    layers = []
    for d_in, d_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(d_in, d_out), act()]
    return nn.Sequential(*layers[:-1])


def compiler(optimizer: str):
    """model, loss (the task's standard loss for that model, or None) -> the compiled model."""
    def make(model, loss=None):
        if optimizer == "kfac_loss":
            return gnfx.compile(model, "kfac", loss=loss) if loss else gnfx.compile(model, "kfac", lr=LR)
        return gnfx.compile(model, optimizer, lr=LR)
    return make


def gan(make, steps):
    G, D = mlp(4, 32, 16), mlp(16, 32, 1, act=nn.LeakyReLU)
    g, d = make(G), make(D, "binary_cross_entropy")
    real = torch.randn(32, 16) * 0.5 + 1
    bce, losses = F.binary_cross_entropy_with_logits, []
    targets = torch.cat([torch.ones(32, 1), torch.zeros(32, 1)])
    for _ in range(steps):
        fake = g(torch.randn(32, 4))
        d.zero_grad()
        d_loss = bce(d(torch.cat([real, fake.detach()])), targets)
        d_loss.backward()
        d.step()
        g.zero_grad()
        out = d(fake)
        g_loss = bce(out, torch.ones_like(out))
        g_loss.backward()
        g.step()
        losses.append(f"{d_loss.item():.3g}/{g_loss.item():.3g}")
    return losses


def wgan_gp(make, steps):
    G, D = mlp(4, 32, 16), mlp(16, 32, 1, act=nn.SiLU)
    g, d = make(G), make(D)
    real, losses = torch.randn(32, 16) * 0.5 + 1, []
    for _ in range(steps):
        for _ in range(2):
            fake = g(torch.randn(32, 4)).detach()
            eps = torch.rand(32, 1)
            x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
            d_loss = d(fake).mean() - d(real).mean() + 10 * ((grad.norm(dim=1) - 1) ** 2).mean()
            d.zero_grad()
            d_loss.backward()
            d.step()
        g.zero_grad()
        g_loss = -d(g(torch.randn(32, 4))).mean()
        g_loss.backward()
        g.step()
        losses.append(f"{d_loss.item():.3g}/{g_loss.item():.3g}")
    return losses


def r1(make, steps):
    G, D = mlp(4, 32, 16), mlp(16, 32, 1, act=nn.LeakyReLU)
    g, d = make(G), make(D, "binary_cross_entropy")
    real, losses = torch.randn(32, 16) * 0.5 + 1, []
    targets = torch.cat([torch.ones(32, 1), torch.zeros(32, 1)])
    bce = F.binary_cross_entropy_with_logits
    for _ in range(steps):
        x = torch.cat([real, g(torch.randn(32, 4)).detach()]).requires_grad_(True)
        out = d(x)
        (grad,) = torch.autograd.grad(out[:32].sum(), x, create_graph=True)
        d_loss = bce(out, targets) + 5 * grad[:32].square().sum(1).mean()
        d.zero_grad()
        d_loss.backward()
        d.step()
        g.zero_grad()
        out = d(g(torch.randn(32, 4)))
        g_loss = bce(out, torch.ones_like(out))
        g_loss.backward()
        g.step()
        losses.append(f"{d_loss.item():.3g}/{g_loss.item():.3g}")
    return losses


def classes(n=64, d=10, c=5):
    return torch.randn(n, d), torch.randint(0, c, (n,))


def distill(make, steps, temperature=2.0):
    teacher = gnfx.compile(mlp(10, 64, 5), "kfac", lr=LR).eval()
    before = [p.clone() for p in teacher.parameters()]
    student = make(mlp(10, 16, 5), "cross_entropy")
    x, y = classes()
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
        loss = kl * temperature ** 2 + F.cross_entropy(s, y)
        loss.backward()
        student.step()
        student.zero_grad()
        losses.append(f"{loss.item():.3g}")
    moved = teacher.optimizer.steps or any(not torch.equal(p, q) for p, q in zip(before, teacher.parameters()))
    return losses + (["the teacher moved"] if moved else [])


def mixup(make, steps):
    model = make(mlp(10, 32, 5), "cross_entropy")
    x, y = classes()
    losses = []
    for _ in range(steps):
        lam, perm = 0.7, torch.randperm(len(x))
        out = model(lam * x + (1 - lam) * x[perm])
        loss = lam * F.cross_entropy(out, y, label_smoothing=0.1) + \
            (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=0.1)
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{loss.item():.3g}")
    return losses


class ActorCritic(nn.Module):
    def __init__(self, d=8, actions=4):
        super().__init__()
        self.trunk = mlp(d, 32, 32)
        self.policy, self.value = nn.Linear(32, actions), nn.Linear(32, 1)

    def forward(self, obs):
        h = torch.tanh(self.trunk(obs))
        return self.policy(h), self.value(h).squeeze(-1)


def rollout(n=64, d=8):
    """Observations and returns of a made-up environment: the return is high for action argmax(obs[:4])."""
    obs = torch.randn(n, d)
    return obs, lambda actions: (actions == obs[:, :4].argmax(1)).float() + 0.1 * torch.randn(n)


def actor_critic(make, steps):
    model = make(ActorCritic(), "cross_entropy")
    losses = []
    for _ in range(steps):
        obs, reward = rollout()
        logits, value = model(obs)
        dist = torch.distributions.Categorical(logits=logits)
        actions = dist.sample()
        returns = reward(actions)
        advantage = (returns - value).detach()
        loss = -(dist.log_prob(actions) * advantage).mean() + 0.5 * F.mse_loss(value, returns) \
            - 0.01 * dist.entropy().mean()
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{returns.mean().item():.3g}")
    return losses


def reinforce(make, steps):
    model = make(mlp(8, 32, 4), "cross_entropy")
    losses = []
    for _ in range(steps):
        obs, reward = rollout()
        dist = torch.distributions.Categorical(logits=model(obs))
        actions = dist.sample()
        returns = reward(actions)
        loss = -(dist.log_prob(actions) * (returns - returns.mean())).mean()
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{returns.mean().item():.3g}")
    return losses


def fgsm(make, steps, eps=0.1):
    model = make(mlp(10, 32, 5), "cross_entropy")
    x, y = classes()
    losses = []
    for _ in range(steps):
        x_in = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
        loss = F.cross_entropy(model(x + eps * grad.sign()), y)
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{loss.item():.3g}")
    return losses


def maml(make, steps, inner_lr=0.1):
    net = mlp(10, 32, 5)
    model = make(net, "cross_entropy")
    x, y = classes(n=40)
    losses = []
    for _ in range(steps):
        params = dict(net.named_parameters())
        inner = F.cross_entropy(functional_call(model, params, (x[:20],)), y[:20])
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
        loss = F.cross_entropy(functional_call(model, fast, (x[20:],)), y[20:])
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{loss.item():.3g}")
    return losses


def freeze(make, steps):
    net = mlp(10, 32, 32, 5)
    model = make(net, "cross_entropy")
    x, y = classes()
    losses = []
    for step in range(max(steps, 6)):
        net[0].requires_grad_(not 2 <= step < 4)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.step()
        model.zero_grad()
        losses.append(f"{loss.item():.3g}")
    return losses


TASKS = {"gan": gan, "wgan_gp": wgan_gp, "r1": r1, "distill": distill, "mixup": mixup, "actor_critic": actor_critic,
         "reinforce": reinforce, "fgsm": fgsm, "maml": maml, "freeze": freeze}


def probe(task: str, optimizer: str, steps: int) -> str:
    """One table row: `task` for `steps` steps with every model it trains compiled for `optimizer`."""
    torch.manual_seed(0)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = TASKS[task](compiler(optimizer), steps)
    said = sorted({str(w.message)[:100].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")
                   or "gnfx" in str(w.filename)})
    return f"| {task} | {optimizer} | {', '.join(losses)} | {'; '.join(said) or '–'} | {time.time() - start:.0f} |"


def main() -> None:
    probe_main(__doc__, "benchmarks.task_probe", probe, {"tasks": list(TASKS), "optimizers": list(OPTIMIZERS)},
               ["| task | optimizer | losses | gnfx's warnings | s |", "|---|---|---|---|---|"], steps=4, timeout=300)


if __name__ == "__main__":
    main()
