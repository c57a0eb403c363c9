"""First contact with reinforcement learning: CleanRL's scripts in plain torch, and stable-baselines3, called as
their users call them.

    PYTHONPATH=<gymnasium, farama_notifications, stable_baselines3>:. OMP_NUM_THREADS=1 python -m benchmarks.rl_probe \
        [--models ppo dqn sac sb3_ppo sb3_dqn sb3_sac] [--optimizers kfac kfac_lr shampoo diag auto adamw] \
        [--steps 4] [--timeout 600] [--out probe.md]

One model and optimizer per process (benchmarks.child_rows), on gymnasium's CartPole-v1 (discrete) and
Pendulum-v1 (continuous), seed 0, `--steps` chunks of training, each reported as the mean return of the
episodes that ended in it and the mean training loss:

- `ppo`: CleanRL's ppo.py (4 envs, 128 steps a rollout, GAE, 2 epochs of 4 minibatches, the clipped
  surrogate with the value loss and the entropy bonus, clip_grad_norm_ 0.5, the lr annealed through the param
  group); its `Agent` has no forward: the rollout calls `get_action_and_value` and `get_value` under no_grad,
  the update `get_action_and_value(b_obs[mb], b_actions[mb])`; compiled with
  `methods=["get_action_and_value", "get_value"]`. A chunk is one rollout and its update.
- `dqn`: CleanRL's dqn.py (QNetwork 120-84, a replay buffer, ε-greedy acting through the trained network
  without no_grad, as the script does, the TD target from a target network under no_grad, F.mse_loss, the
  target network copied with `target.load_state_dict(q_network.state_dict())` every 250 steps, and once the
  other way to check that it loads). A chunk is 1,000 env steps (training from step 500, every 4th).
- `sac`: CleanRL's sac_continuous_action.py (width 64: an Actor whose `get_action` calls its forward and
  samples, two SoftQNetworks and their Polyak-averaged targets, a learnable log_alpha with its own Adam, the
  policy updated every 2nd step); the actor compiled with `methods=["get_action"]`, each Q network compiled
  on its own (one gnfx optimizer per model: CleanRL's one Adam over both Q networks becomes two). A chunk is
  500 env steps (training from step 200).
- `sb3_ppo`, `sb3_dqn`, `sb3_sac`: stable-baselines3's PPO, DQN and SAC ("MlpPolicy"), handed gnfx the way that
  works (README "Training loops"): the policy stays where sb3 keeps it, the method its training calls and
  its optimizer are the compiled model's: PPO `policy.evaluate_actions = compiled.evaluate_actions;
  policy.optimizer = compiled.optimizer`; DQN `model.q_net = compiled q_net; policy.optimizer = ...`; SAC
  the actor's `action_log_prob` and optimizer, and `model.critic = compiled critic`. Chunks as above
  (PPO: one rollout of 256 steps, 2 epochs of batch 64).

Optimizers: "kfac" at its defaults (no loss=: an RL loss is none gnfx models; lr 1e-3), and at lr 3e-4
"kfac_lr", "kfac_noclip" (kl_clip=0), "shampoo", "diag" and "auto", "kfac_acktr" (ACKTR's lr 0.25 with
gnfx's default KL clipping κ = 1e-3, which ACKTR's is), and torch.optim.AdamW at 3e-4 ("adamw"; CleanRL's Adam). Per run: the
capture's form, the share of the trainable parameters in curvature blocks, exactness (the kfac_lr rows: one
statistic step in float64 beside a copy of the model with plain hooks, benchmarks.hooked_calls: the largest
relative gap of any block's A and S and of any gradient), returns and losses per chunk, gnfx's warnings (once
each), the seconds; or the error. The results: benchmarks/results/first_contact_11_rl.md.
"""
from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Normal

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors

LR = 3e-4
CLEANRL = ("ppo", "dqn", "sac")
SB3 = ("sb3_ppo", "sb3_dqn", "sb3_sac")
MODELS = (*CLEANRL, *SB3)
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_lr": ("kfac", {"lr": LR}), "shampoo": ("shampoo", {"lr": LR}),
              "kfac_noclip": ("kfac", {"lr": LR, "kl_clip": 0.0}), "kfac_acktr": ("kfac", {"lr": 0.25}),
              "diag": ("diag", {"lr": LR}),
              "auto": ("auto", {"lr": LR}), "adamw": ("adamw", {"lr": LR})}


def _import(name: str):
    return library("benchmarks.rl_probe", name)


def trained(module: nn.Module, optimizer: str, methods=()):
    """(the module to call, its optimizer): gnfx.compile's, or the module itself with torch.optim.AdamW."""
    kind, hparams = OPTIMIZERS[optimizer]
    if kind == "adamw":
        return module, torch.optim.AdamW(module.parameters(), **hparams)
    c = gnfx.compile(module, kind, methods=list(methods), **hparams)
    return c, c.optimizer


class Envs:
    """`n` gymnasium environments stepped together, each reset when its episode ends (terminated or
    truncated, as CleanRL's `next_done`), the returns of the episodes that ended kept in `returns`."""

    def __init__(self, name: str, n: int, seed: int):
        gym = _import("gymnasium")
        self.envs = [gym.make(name) for _ in range(n)]
        self.obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)]).astype(np.float32)
        for i, e in enumerate(self.envs):  # its sample() draws from a generator reset(seed=) leaves unseeded
            e.action_space.seed(seed + i)
        self.running, self.returns = np.zeros(n), []
        self.single_action_space = self.envs[0].action_space

    def step(self, actions):
        rewards, dones = np.zeros(len(self.envs), np.float32), np.zeros(len(self.envs), np.float32)
        next_obs = []
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards[i], dones[i] = reward, terminated or truncated
            self.running[i] += reward
            if dones[i]:
                self.returns.append(self.running[i])
                self.running[i] = 0.0
                obs, _ = env.reset()
            next_obs.append(obs)
        self.obs = np.stack(next_obs).astype(np.float32)
        return self.obs, rewards, dones

    def chunk_return(self) -> float:
        """The mean return of the episodes that ended since the last call (NaN if none did)."""
        done, self.returns = self.returns, []
        return float(np.mean(done)) if done else float("nan")


def layer_init(layer: nn.Linear, std=np.sqrt(2), bias_const=0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class PPOAgent(nn.Module):
    """CleanRL's ppo.py Agent."""

    def __init__(self, obs: int, actions: int):
        super().__init__()
        self.critic = nn.Sequential(layer_init(nn.Linear(obs, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                    nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0))
        self.actor = nn.Sequential(layer_init(nn.Linear(obs, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                   nn.Tanh(), layer_init(nn.Linear(64, actions), std=0.01))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        logits = self.actor(x)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


def ppo_minibatch_loss(agent, obs, actions, logprobs, advantages, returns, values):
    """CleanRL's PPO loss of one minibatch (norm_adv, clip_coef 0.2, clip_vloss, ent_coef 0.01, vf_coef 0.5)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions.long())
    ratio = (newlogprob - logprobs).exp()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 0.8, 1.2)).mean()
    newvalue = newvalue.view(-1)
    v_clipped = values + torch.clamp(newvalue - values, -0.2, 0.2)
    v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    return pg_loss - 0.01 * entropy.mean() + v_loss * 0.5


def run_ppo(optimizer: str, chunks: int, on_built=None):
    envs, num_steps, num_envs = Envs("CartPole-v1", 4, 0), 128, 4
    agent, opt = trained(PPOAgent(4, 2), optimizer, ["get_action_and_value", "get_value"])
    if on_built:
        on_built(agent)
    obs = torch.zeros(num_steps, num_envs, 4)
    actions, logprobs, rewards, dones, values = (torch.zeros(num_steps, num_envs) for _ in range(5))
    next_obs, next_done = torch.tensor(envs.obs), torch.zeros(num_envs)
    rows = []
    for update in range(chunks):
        opt.param_groups[0]["lr"] = (1.0 - update / chunks) * opt.defaults["lr"]  # anneal_lr
        for step in range(num_steps):
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value.flatten(), action, logprob
            o, r, d = envs.step(action.numpy())
            rewards[step], next_obs, next_done = torch.tensor(r), torch.tensor(o), torch.tensor(d)
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages, lastgaelam = torch.zeros_like(rewards), 0
            for t in reversed(range(num_steps)):
                nextnonterminal = 1.0 - (next_done if t == num_steps - 1 else dones[t + 1])
                nextvalues = next_value if t == num_steps - 1 else values[t + 1]
                delta = rewards[t] + 0.99 * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + 0.99 * 0.95 * nextnonterminal * lastgaelam
            returns = advantages + values
        b = [t.reshape(-1, *t.shape[2:]) for t in (obs, actions, logprobs, advantages, returns, values)]
        losses, batch = [], num_steps * num_envs
        for _ in range(2):
            order = torch.randperm(batch)
            for start in range(0, batch, batch // 4):
                mb = order[start:start + batch // 4]
                loss = ppo_minibatch_loss(agent, *(t[mb] for t in b))
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                opt.step()
                losses.append(loss.item())
        rows.append((envs.chunk_return(), float(np.mean(losses))))
    return agent, rows


class QNetwork(nn.Module):
    """CleanRL's dqn.py QNetwork."""

    def __init__(self, obs: int, actions: int):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(obs, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                     nn.Linear(84, actions))

    def forward(self, x):
        return self.network(x)


def run_dqn(optimizer: str, chunks: int, on_built=None):
    envs, total, size = Envs("CartPole-v1", 1, 0), 1000 * chunks, 10000
    q_network, opt = trained(QNetwork(4, 2), optimizer)
    if on_built:
        on_built(q_network)
    target_network = QNetwork(4, 2)
    target_network.load_state_dict(q_network.state_dict())
    buffer = {k: torch.zeros(size, *shape) for k, shape in (("obs", (4,)), ("next", (4,)), ("action", ()),
                                                              ("reward", ()), ("done", ()))}
    rng, rows, losses = np.random.default_rng(0), [], []
    obs = torch.tensor(envs.obs)
    for global_step in range(total):
        epsilon = max(0.05, 1.0 - global_step / (0.5 * total) * 0.95)
        if rng.random() < epsilon:
            action = np.array([envs.single_action_space.sample()])
        else:
            action = torch.argmax(q_network(obs), dim=1).numpy()  # as dqn.py: no no_grad
        next_obs, reward, done = envs.step(action)
        i = global_step % size
        buffer["obs"][i], buffer["next"][i], buffer["action"][i] = obs[0], torch.tensor(next_obs[0]), float(action[0])
        buffer["reward"][i], buffer["done"][i] = float(reward[0]), float(done[0])
        obs = torch.tensor(next_obs)
        if global_step >= 500 and global_step % 4 == 0:
            idx = torch.as_tensor(rng.integers(0, min(global_step + 1, size), 64))
            with torch.no_grad():
                target_max, _ = target_network(buffer["next"][idx]).max(dim=1)
                td_target = buffer["reward"][idx] + 0.99 * target_max * (1 - buffer["done"][idx])
            old_val = q_network(buffer["obs"][idx]).gather(1, buffer["action"][idx].long()[:, None]).squeeze()
            loss = F.mse_loss(td_target, old_val)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if global_step % 250 == 0:
            target_network.load_state_dict(q_network.state_dict())
        if global_step == total // 2:  # and back: a plain module's state_dict into the trained one
            q_network.load_state_dict(target_network.state_dict())
        if (global_step + 1) % 1000 == 0:
            rows.append((envs.chunk_return(), float(np.mean(losses)) if losses else float("nan")))
            losses = []
    return q_network, rows


class SoftQNetwork(nn.Module):
    def __init__(self, obs: int, actions: int, width: int = 64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(obs + actions, width), nn.Linear(width, width), nn.Linear(width, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SACActor(nn.Module):
    """CleanRL's sac_continuous_action.py Actor (width 64)."""

    def __init__(self, obs: int, actions: int, low, high, width: int = 64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs, width), nn.Linear(width, width)
        self.fc_mean, self.fc_logstd = nn.Linear(width, actions), nn.Linear(width, actions)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, x):
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        mean, log_std = self.fc_mean(x), torch.tanh(self.fc_logstd(x))
        return mean, -5 + 0.5 * (2 - (-5)) * (log_std + 1)

    def get_action(self, x):
        mean, log_std = self(x)
        normal = Normal(mean, log_std.exp())
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        log_prob = normal.log_prob(x_t) - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        return action, log_prob.sum(1, keepdim=True), torch.tanh(mean) * self.action_scale + self.action_bias


def run_sac(optimizer: str, chunks: int, on_built=None):
    envs, total = Envs("Pendulum-v1", 1, 0), 500 * chunks
    space = envs.single_action_space
    actor, actor_opt = trained(SACActor(3, 1, space.low, space.high), optimizer, ["get_action"])
    (qf1, q1_opt), (qf2, q2_opt) = trained(SoftQNetwork(3, 1), optimizer), trained(SoftQNetwork(3, 1), optimizer)
    if on_built:
        on_built(actor)
    qf1_target, qf2_target = SoftQNetwork(3, 1), SoftQNetwork(3, 1)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    log_alpha = torch.zeros(1, requires_grad=True)
    alpha, a_optimizer, target_entropy = log_alpha.exp().item(), torch.optim.Adam([log_alpha], lr=1e-3), -1.0
    buffer = {k: torch.zeros(total, n) for k, n in (("obs", 3), ("next", 3), ("action", 1), ("reward", 1), ("done", 1))}
    rng, rows, losses = np.random.default_rng(0), [], []
    obs = torch.tensor(envs.obs)
    for step in range(total):
        if step < 200:
            action = np.array([space.sample()])
        else:
            with torch.no_grad():
                action = actor.get_action(obs)[0].numpy()
        next_obs, reward, done = envs.step(action)
        for k, v in (("obs", obs[0]), ("next", next_obs[0]), ("action", action[0]), ("reward", reward[:1]),
                     ("done", done[:1])):
            buffer[k][step] = torch.as_tensor(v)
        obs = torch.tensor(next_obs)
        if step >= 200:
            idx = torch.as_tensor(rng.integers(0, step + 1, 64))
            b_obs, b_next, b_act = buffer["obs"][idx], buffer["next"][idx], buffer["action"][idx]
            with torch.no_grad():
                next_actions, next_log_pi, _ = actor.get_action(b_next)
                min_next = torch.min(qf1_target(b_next, next_actions), qf2_target(b_next, next_actions))
                next_q = buffer["reward"][idx].flatten() + (1 - buffer["done"][idx].flatten()) * 0.99 * (
                    min_next - alpha * next_log_pi).view(-1)
            qf_loss = F.mse_loss(qf1(b_obs, b_act).view(-1), next_q) + F.mse_loss(qf2(b_obs, b_act).view(-1), next_q)
            q1_opt.zero_grad()
            q2_opt.zero_grad()
            qf_loss.backward()
            q1_opt.step()
            q2_opt.step()
            losses.append(qf_loss.item())
            if step % 2 == 0:
                pi, log_pi, _ = actor.get_action(b_obs)
                actor_loss = (alpha * log_pi - torch.min(qf1(b_obs, pi), qf2(b_obs, pi))).mean()
                actor_opt.zero_grad()
                actor_loss.backward()
                actor_opt.step()
                with torch.no_grad():
                    _, log_pi, _ = actor.get_action(b_obs)
                alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                a_optimizer.zero_grad()
                alpha_loss.backward()
                a_optimizer.step()
                alpha = log_alpha.exp().item()
            with torch.no_grad():
                for net, target in ((qf1, qf1_target), (qf2, qf2_target)):
                    for p, t in zip(net.parameters(), target.parameters()):
                        t.data.copy_(0.005 * p.data + 0.995 * t.data)
        if (step + 1) % 500 == 0:
            rows.append((envs.chunk_return(), float(np.mean(losses)) if losses else float("nan")))
            losses = []
    return actor, rows


def sb3_model(name: str, optimizer: str):
    """The stable-baselines3 algorithm of `name` with gnfx handed over (module doc); (algorithm, compiled policy
    part that the table reports on, or None for adamw)."""
    sb3 = _import("stable_baselines3")
    kind, hparams = OPTIMIZERS[optimizer]
    common = dict(seed=0, device="cpu", learning_rate=hparams.get("lr", 1e-3))
    if kind == "adamw":
        common["policy_kwargs"] = {"optimizer_class": torch.optim.AdamW}
    if name == "sb3_ppo":
        model = sb3.PPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, n_epochs=2, **common)
    elif name == "sb3_dqn":
        model = sb3.DQN("MlpPolicy", "CartPole-v1", learning_starts=500, train_freq=4, target_update_interval=250,
                        batch_size=64, buffer_size=10000, exploration_fraction=0.5, **common)
    else:
        model = sb3.SAC("MlpPolicy", "Pendulum-v1", learning_starts=200, batch_size=64, buffer_size=10000,
                        policy_kwargs={**common.pop("policy_kwargs", {}), "net_arch": [64, 64]}, **common)
    if kind == "adamw":
        return model, None
    if name == "sb3_ppo":
        policy = model.policy
        compiled = gnfx.compile(policy, kind, methods=["evaluate_actions"], **hparams)
        policy.evaluate_actions, policy.optimizer = compiled.evaluate_actions, compiled.optimizer
    elif name == "sb3_dqn":
        compiled = gnfx.compile(model.policy.q_net, kind, **hparams)
        model.q_net, model.policy.optimizer = compiled, compiled.optimizer
    else:
        compiled = gnfx.compile(model.actor, kind, methods=["action_log_prob"], **hparams)
        model.actor.action_log_prob, model.actor.optimizer = compiled.action_log_prob, compiled.optimizer
        critic = gnfx.compile(model.critic, kind, **hparams)
        model.critic = critic
    return model, compiled


def run_sb3(name: str, optimizer: str, chunks: int):
    model, compiled = sb3_model(name, optimizer)
    per_chunk = {"sb3_ppo": 256, "sb3_dqn": 1000, "sb3_sac": 500}[name]
    rows, seen = [], 0
    for _ in range(chunks):
        model.learn(per_chunk, reset_num_timesteps=False)
        episodes = [e["r"] for e in model.ep_info_buffer]
        new = episodes[seen:] if len(episodes) < model.ep_info_buffer.maxlen else episodes[-1:]
        seen = len(episodes)
        logged = model.logger.name_to_value
        loss = logged.get("train/loss", logged.get("train/critic_loss", float("nan")))
        rows.append((float(np.mean(new)) if new else float("nan"), float(loss)))
    return compiled, rows


# ----------------------------------------------------------------------------- exactness against hooks


def _linear_factors(records, m: int) -> dict:
    """A = mean of ā āᵀ over the rows of every call, S = M Σ g gᵀ (docs/design.md §1, "expand")."""
    A, gg = linear_factors(records, bias=True)
    return {"A": A, "S": m * gg}


def exactness_case(name: str, dtype: torch.dtype):
    """(module, methods, loss(module) of one statistic step on fixed data of `dtype`, M) for `name`."""
    g = torch.Generator().manual_seed(1)
    n = 32

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    if name in ("ppo", "sb3_ppo"):
        obs, acts = rand(n, 4), torch.randint(0, 2, (n,), generator=g)
        adv, ret, val, old = rand(n), rand(n), rand(n), rand(n) * 0.1 - 0.7
        if name == "ppo":
            return PPOAgent(4, 2), ["get_action_and_value"], lambda m: ppo_minibatch_loss(
                m, obs, acts.to(dtype), old, adv, ret, val), n
        model, _ = sb3_model("sb3_ppo", "adamw")

        def sb3_ppo_loss(m):
            values, log_prob, entropy = m.evaluate_actions(obs, acts)
            ratio = (log_prob - old).exp()
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            return pg + 0.5 * F.mse_loss(ret, values.flatten()) - 0.01 * entropy.mean()
        return model.policy, ["evaluate_actions"], sb3_ppo_loss, n
    if name in ("dqn", "sb3_dqn"):
        obs, acts, target = rand(n, 4), torch.randint(0, 2, (n, 1), generator=g), rand(n)
        module = QNetwork(4, 2) if name == "dqn" else sb3_model("sb3_dqn", "adamw")[0].policy.q_net
        return module, [], lambda m: F.mse_loss(target, m(obs).gather(1, acts).squeeze()), n
    obs, target = rand(n, 3), rand(n)
    if name == "sac":
        module, method = SACActor(3, 1, np.array([-2.0]), np.array([2.0])), "get_action"
    else:
        module, method = sb3_model("sb3_sac", "adamw")[0].actor, "action_log_prob"

    def actor_loss(m):
        torch.manual_seed(5)  # the same reparametrized sample for both
        action, log_pi = getattr(m, method)(obs)[:2]
        return (0.2 * log_pi.flatten() - action.flatten() * target).mean()
    return module, [method], actor_loss, n


def exactness(name: str, hparams: dict) -> str:
    """'A/S Δ, grad Δ' (relative, the largest over the blocks and parameters): one statistic step of the
    compiled model beside a copy with plain hooks on its blocks' layers, in float64 (stable-baselines3's: in
    float32, as its preprocess_obs casts the observations to)."""
    dtype = torch.float32 if name in SB3 else torch.float64
    module, methods, loss_of, m = exactness_case(name, dtype)
    module = module.to(dtype).train()
    reference = copy.deepcopy(module)
    c = gnfx.compile(module, "kfac", methods=methods, stat_every=1, stat_decay=0.0, **hparams)
    loss_of(c).backward()
    c.step()
    names = [b.name for b in c.layers]
    with hooked_calls(reference, names) as records:
        loss_of(reference).backward()
    factor_gap = max(((c.statistics(b)[k] - f).norm() / f.norm()).item()
                     for b in names for k, f in _linear_factors(records[b], m).items())
    grad_gap = max(((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-300)).item()
                   for p, q in zip(module.parameters(), reference.parameters()) if q.grad is not None)
    return f"{factor_gap:.0e}, {grad_gap:.0e}"


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` chunks of `name`."""
    kind, hparams = OPTIMIZERS[optimizer]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if name in SB3:
        _import("stable_baselines3")
    start, rows, error, c = time.time(), [], "", None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exact = exactness(name, hparams) if optimizer == "kfac_lr" else "–"
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact, error = "error", f"exactness: {type(exc).__name__}: {exc}"
        torch.manual_seed(0)
        try:
            if name in SB3:
                c, rows = run_sb3(name, optimizer, steps)
            else:
                c, rows = {"ppo": run_ppo, "dqn": run_dqn, "sac": run_sac}[name](optimizer, steps)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
    form, blocks = capture_cells(c, getattr(c, "_model", None), fallbacks=False)
    said = gnfx_warnings(caught, 200)
    returns = ", ".join(f"{r:.0f}" for r, _ in rows) or "–"
    losses = ", ".join(f"{loss:.3g}" for _, loss in rows) or "–"
    setting = ", ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults"
    return (f"| {name} | {optimizer} ({setting}) | {form} | {blocks} | {exact} | {returns} | {losses} | "
            f"{'; '.join(said) or '–'} | {cell(error, 500) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.rl_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: A/S, grad (relative; float64, sb3 float32) | returns per chunk | "
                "losses per chunk | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=600)


if __name__ == "__main__":
    main()
