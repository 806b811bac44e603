"""Soft actor-critic from scratch: the baseline residual RL is measured against.

Same task, same low-dim observations and normalization (the feature statistics of a
given policy checkpoint), same critic ensemble, replay, n-step returns and loop as
:mod:`robopolicy.rl.residual`; only the actor differs: a tanh-Gaussian over the whole
action box with a learned entropy temperature, uniform random actions for the first
``learning_starts`` steps, and no base policy and no demonstrations. A baseline for
benchmarks: it writes the log and curve but no policy checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robopolicy.errors import RobopolicyError
from robopolicy.rl import loop
from robopolicy.rl.config import SACArgs
from robopolicy.rl.envs import check_policy_fits_env, close_vector_env, make_vector_env
from robopolicy.rl.networks import CriticEnsemble, GaussianActor, ObservationFlattener, min_over_subset
from robopolicy.rl.replay import Batch, ReplayBuffer
from robopolicy.rl.residual import critic_step
from robopolicy.spec import FeatureSpec
from robopolicy.train.checkpoint import read_policy_meta, resolve_checkpoint
from robopolicy.train.evaluate import env_kwargs
from robopolicy.train.optim import adamw


class Temperature(nn.Module):
    """The entropy temperature ``alpha = exp(log_alpha)``."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))

    def forward(self) -> torch.Tensor:
        return self.log_alpha.exp()


class SACPredictor:
    """The deterministic (mean) SAC action as one-step chunks, for the evaluator."""

    def __init__(self, actor: GaussianActor, features: ObservationFlattener, spec: FeatureSpec) -> None:
        self.actor, self.features = actor, features
        self.spec = spec.with_timing(1, 1, 1)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, Any]) -> np.ndarray:
        device = self.actor.center.device
        state = self.features.flatten({k: torch.as_tensor(obs[k][:, -1], device=device) for k in self.features.keys})
        action, _ = self.actor(self.features.normalize_state(state), deterministic=True)
        return action[:, None].cpu().numpy()


class SACAgent:
    """SAC with a critic ensemble (min over a random subset) and automatic entropy tuning."""

    def __init__(self, spec: FeatureSpec, low: np.ndarray, high: np.ndarray, args: SACArgs) -> None:
        self.spec, self.args, self.device = spec, args, args.torch_device()
        self.features = ObservationFlattener(spec).to(self.device)
        da = spec.action.dim
        self.low, self.high = torch.as_tensor(low), torch.as_tensor(high)
        self.actor = GaussianActor(self.features.dim, da, args.actor_hidden, low, high).to(self.device)
        self.critic = CriticEnsemble(args.num_critics, self.features.dim + da, args.critic_hidden).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.temperature = Temperature(args.init_alpha).to(self.device)
        self.target_entropy = -float(da)
        self.actor_optim = adamw(self.actor.parameters(), lr=args.lr_actor)
        self.critic_optim = adamw(self.critic.parameters(), lr=args.lr_critic)
        self.alpha_optim = adamw(self.temperature.parameters(), lr=args.lr_actor)
        self.last_actor: dict[str, float] = {}

    @torch.no_grad()
    def act(self, state: torch.Tensor, base: torch.Tensor, explore: bool, warmup: bool) -> torch.Tensor:
        if warmup:
            return self.low + (self.high - self.low) * torch.rand(len(state), len(self.low))
        action, _ = self.actor(self.features.normalize_state(state.to(self.device)), deterministic=not explore)
        return action.cpu()

    def update(self, batch: Batch, update_actor: bool) -> dict[str, float]:
        batch = Batch(*(t.to(self.device, non_blocking=True) for t in batch))
        f, alpha = self.features, self.temperature().detach()
        with torch.no_grad():
            next_action, next_logp = self.actor(f.normalize_state(batch.next_state))
            q_next = min_over_subset(self.critic_target(f.normalize_state(batch.next_state),
                                                        f.normalize_action(next_action)), self.args.critic_subset)
            target = batch.reward + batch.discount * (q_next - alpha * next_logp)
        metrics = critic_step(self.critic, self.critic_target, self.critic_optim,
                              (f.normalize_state(batch.state), f.normalize_action(batch.action)), target, self.args.tau)
        if update_actor:
            state = f.normalize_state(batch.state)
            action, logp = self.actor(state)
            self.critic.requires_grad_(False)
            q = self.critic(state, f.normalize_action(action)).mean(dim=0)
            self.critic.requires_grad_(True)
            loss = (alpha * logp - q).mean()
            self.actor_optim.zero_grad(set_to_none=True)
            loss.backward()
            self.actor_optim.step()
            alpha_loss = -(self.temperature.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_optim.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_optim.step()
            self.last_actor = {"actor_loss": loss.item(), "alpha": alpha.item(), "entropy": -logp.mean().item()}
        return {**metrics, **self.last_actor}

    def predictor(self) -> SACPredictor:
        return SACPredictor(self.actor, self.features, self.spec)

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target,
                "temperature": self.temperature}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optim, "critic": self.critic_optim, "alpha": self.alpha_optim}


def train_sac(args: SACArgs) -> dict[str, Any]:
    """Train SAC from scratch on ``args.env``; writes ``log.json`` and ``learning_curve.png`` to ``args.out``."""
    args.validate()
    if args.resume:
        raise RobopolicyError("the SAC baseline writes no checkpoints and cannot resume")
    torch.manual_seed(args.seed)
    meta = read_policy_meta(resolve_checkpoint(Path(args.stats_from)))
    full = FeatureSpec.from_dict(meta["spec"])
    spec = dataclasses.replace(full, features={f.name: f for f in [*full.state_features, full.action]})
    env_name = args.env or meta.get("env")
    if not env_name:
        raise RobopolicyError("--env is required: the statistics' policy does not record its env")
    envs = make_vector_env(env_name, args.num_envs, {**env_kwargs(spec, args.randomize, args.max_episode_steps),
                                                     "dense_reward": args.dense_reward}, args.vector)
    try:
        check_policy_fits_env(spec, envs, env_name, f"observation statistics of {args.stats_from}")
        agent = SACAgent(spec, envs.single_action_space.low, envs.single_action_space.high, args)
    except BaseException:
        close_vector_env(envs, failed=True)
        raise
    online = ReplayBuffer(args.buffer_size or args.steps, agent.features.dim, spec.action.dim, base_dim=0,
                          num_streams=args.num_envs)
    return loop.train(loop.Setup(args=args, env_name=env_name, envs=envs, agent=agent, features=agent.features,
                                 online=online, demos=None, runner=None, write_policy=None, label="sac"))
