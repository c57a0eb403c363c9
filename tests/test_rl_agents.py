"""Reinforcement-learning agents as CleanRL writes them, in plain torch (benchmarks/results/first_contact_11_rl.md):
their training calls methods other than forward (`get_action_and_value`, `get_value`, `get_action`), which
gnfx.compile(methods=[...]) serves with the layers they call as curvature blocks; the statistics are checked
against plain hooks, in float64. A step whose gradients came from the module itself (its methods called on it,
not on the compiled model) warns. Each test failed before its change.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal

import gnfx
from gnfx.optimizer import GnfxOptimizer
from references import kfac_factors

N, OBS, ACTIONS = 12, 4, 3


class Agent(nn.Module):
    """CleanRL's PPO agent: an actor and a critic MLP, no forward."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(OBS, 8), nn.Tanh(), nn.Linear(8, 1))
        self.actor = nn.Sequential(nn.Linear(OBS, 8), nn.Tanh(), nn.Linear(8, ACTIONS))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class Actor(nn.Module):
    """CleanRL's SAC actor: a forward of the Gaussian's mean and log-std, and get_action calling it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(OBS, 8)
        self.mean = nn.Linear(8, ACTIONS)
        self.log_std = nn.Linear(8, ACTIONS)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.mean(h), torch.tanh(self.log_std(h))

    def get_action(self, x):
        mean, log_std = self(x)
        u = Normal(mean, log_std.exp()).rsample()
        action = torch.tanh(u)
        return action, Normal(mean, log_std.exp()).log_prob(u).sum(1) - torch.log(1 - action.pow(2) + 1e-6).sum(1)


def ppo_loss(agent, x, actions, advantages, returns):
    """CleanRL's PPO loss on one minibatch, through `agent.get_action_and_value`."""
    _, log_prob, entropy, value = agent.get_action_and_value(x, actions)
    ratio = log_prob.exp()  # the rollout's log-probabilities are these at the first epoch's step
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    return surrogate + 0.5 * (value.view(-1) - returns).pow(2).mean() - 0.01 * entropy.mean()


def hooked(module: nn.Module, names):
    """{name: [[a, g], ...]}: each training call's input and output gradient of the submodules `names`, by
    plain hooks (calls without gradients are not recorded)."""
    calls = {name: [] for name in names}
    for name in names:
        def hook(_, inputs, output, records=calls[name]):
            if not output.requires_grad:
                return
            records.append([inputs[0].detach(), None])
            output.register_hook(lambda g, record=records[-1]: record.__setitem__(1, g.detach()))
        module.get_submodule(name).register_forward_hook(hook)
    return calls


def compile_agent(model, methods, **options):
    return gnfx.compile(model, optimizer="kfac", lr=1e-2, stat_every=1, stat_decay=0.0, methods=methods, **options)


def test_an_agents_methods_train_with_the_statistics_plain_hooks_see():
    """Before, `compiled.get_action_and_value` was an AttributeError: a CleanRL agent (no forward) could only
    be trained by calling the module itself, with an optimizer whose statistics never saw a batch. Now its
    methods run as written, the actor's and critic's layers are blocks, and A and S are the hooks'; the
    rollout's no-grad calls add nothing, and the value bootstrap `get_value` is a second entry point."""
    torch.manual_seed(0)
    agent = Agent().double()
    reference = copy.deepcopy(agent)
    names = ["actor.0", "actor.2", "critic.0", "critic.2"]
    calls = hooked(reference, names)
    c = compile_agent(agent, ["get_action_and_value", "get_value"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, OBS, generator=g, dtype=torch.float64)
    for step in range(2):
        with torch.no_grad():  # the rollout: sampled actions, no statistics
            torch.manual_seed(step)
            actions, _, _, values = c.get_action_and_value(x)
            torch.manual_seed(step)
            assert torch.equal(actions, reference.get_action_and_value(x)[0])
            assert torch.equal(c.get_value(x), values)
        advantages, returns = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g,
                                                                                            dtype=torch.float64)
        for records in calls.values():
            records.clear()
        loss, loss_ref = (ppo_loss(m, x, actions, advantages, returns) for m in (c, reference))
        loss.backward()
        loss_ref.backward()
        for (name, p), q in zip(agent.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
        c.step()
        c.zero_grad()
        reference.zero_grad()
        for name in names:
            expected = kfac_factors(calls[name], True, "expand", N)
            for k in ("A", "S"):
                torch.testing.assert_close(c.statistics(name)[k], expected[k], rtol=1e-10, atol=1e-12)
        reference.load_state_dict(agent.state_dict())
    assert not c.layers.fallbacks
    assert "block actor.0 (called by the Python code of the model's method get_action_and_value" in c.report()
    for records in calls.values():
        records.clear()
    for m in (c, reference):  # a value loss through the second method
        m.get_value(x).pow(2).mean().backward()
    c.step()
    for name in ("critic.0", "critic.2"):
        expected = kfac_factors(calls[name], True, "expand", N)
        for k in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[k], expected[k], rtol=1e-10, atol=1e-12)


def test_a_method_that_calls_the_traced_forward_taps_its_layers():
    """SAC's actor: its forward is captured by torch.fx at compile, and get_action calls it through
    `self(x)`; the method's call taps the same blocks, with A and S as plain hooks see them."""
    torch.manual_seed(0)
    actor = Actor().double()
    reference = copy.deepcopy(actor)
    names = ["fc", "mean", "log_std"]
    calls = hooked(reference, names)
    c = compile_agent(actor, ["get_action"])
    assert c.layers.form == "fx"
    x = torch.randn(N, OBS, dtype=torch.float64)
    torch.manual_seed(3)
    action, log_prob = c.get_action(x)
    torch.manual_seed(3)
    action_ref, log_prob_ref = reference.get_action(x)
    assert torch.equal(action, action_ref)
    (log_prob.mean() - action.sum(1).mean()).backward()
    (log_prob_ref.mean() - action_ref.sum(1).mean()).backward()
    c.step()
    for name in names:
        expected = kfac_factors(calls[name], True, "expand", N)
        for k in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[k], expected[k], rtol=1e-10, atol=1e-12)


def test_methods_are_checked_at_compile_and_an_unnamed_method_names_the_option():
    with pytest.raises(gnfx.ConfigError, match="has no method 'act'"):
        gnfx.compile(Agent(), "kfac", methods=["act"])
    with pytest.raises(gnfx.ConfigError, match="the compiled model's own"):
        gnfx.compile(Agent(), "kfac", methods=["forward"])
    with pytest.raises(gnfx.ConfigError, match="pass a list of method names"):
        gnfx.compile(Agent(), "kfac", methods="get_value")
    with pytest.raises(gnfx.ConfigError, match="Fix: compile without loss= and with an lr"):
        gnfx.compile(Actor(), "kfac", loss="mse", lr=1e-2, methods=["get_action"])
    with pytest.raises(AttributeError, match=r"methods=\['get_value'\]"):
        gnfx.compile(Agent(), "kfac", methods=["get_action_and_value"]).get_value


def test_a_statistic_step_on_gradients_the_compiled_model_did_not_see_warns():
    """Before, training through the module itself (its methods, with the compiled model's optimizer) stepped
    K-FAC on statistics that never saw a batch, silently. Now such a statistic step warns once, naming
    methods=; steps through the compiled model do not."""
    agent = Agent()
    c = compile_agent(agent, ["get_action_and_value"])
    x = torch.randn(N, OBS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            c.get_action_and_value(x)[1].mean().backward()
            c.step()
            c.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"no training call of the compiled model ran.*methods=\[\.\.\.\]"):
        agent.get_action_and_value(x)[1].mean().backward()
        c.step()


def test_the_optimizer_built_as_a_torch_optimizer_names_gnfx_compile():
    """stable-baselines3's `policy_kwargs=dict(optimizer_class=...)` builds `optimizer_class(params, lr=...)`:
    before, GnfxOptimizer raised a bare TypeError ('unexpected keyword argument lr')."""
    with pytest.raises(gnfx.GnfxError, match=r"built by gnfx.compile.*policy.optimizer = compiled.optimizer"):
        GnfxOptimizer(Agent().parameters(), lr=3e-4)


def test_a_forward_replaced_by_the_compiled_models_names_the_hand_off():
    """`critic.forward = compiled.forward` (a hand-off to a library that calls the module) made the compiled
    model and the module call each other: a RecursionError; now a GnfxError naming the hand-offs that work.
    A method handed over the same way is taken from the class, and runs."""
    actor = Actor()
    c = compile_agent(actor, ["get_action"])
    actor.get_action = c.get_action
    actor.get_action(torch.randn(N, OBS))[1].mean().backward()
    actor.forward = c.forward
    with pytest.raises(gnfx.GnfxError, match=r"each would call the other.*model.critic = gnfx.compile"):
        with torch.no_grad():
            actor(torch.randn(N, OBS))
