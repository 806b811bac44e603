"""Residual off-policy RL on top of a frozen behaviour-cloning policy (ResFiT-style).

The BC policy is a black box run with receding-horizon chunks, batched over a vector of
envs. A small per-step residual actor sees the normalized low-dim observation and the
normalized base action of this step and adds ``action_scale * tanh(.)`` to it (last layer
zero-initialised: training starts exactly at the base policy); the sum is clipped to the
env's action box. It learns TD3-style from sparse success rewards:

* critics: an ensemble of LayerNorm MLPs ``Q(s, a_base, a)`` scoring the *executed*
  action; the target is the min over a random subset (REDQ; all of 2 = clipped double-Q)
  at the target actor's smoothed action (TD3 target policy smoothing), with n-step returns;
* ``utd`` gradient updates per env step after ``learning_starts`` steps collected with the
  base (+ exploration noise); critic-only warm-up until ``actor_starts``; one actor update
  (maximize the ensemble-mean Q) per ``actor_delay`` critic updates; Polyak targets;
* replay: every batch mixes online transitions with the BC demonstrations
  (``demo_fraction``, default half).

Demonstrations in replay: each demo frame stores the demonstrator's action as the
executed action and, as its base action, what the frozen base would output there, computed
once at load time by running the base over the demo observations with the same
receding-horizon chunking (a chunk every ``Ta`` frames from the episode start). Because
the critic scores executed actions, demo actions outside ``base +- action_scale`` keep
their true value; the actor can only reach the clipped range. A demo episode shorter than
its env's time limit ended in success (the expert's env terminates on success): its last
transition is terminal with reward 1; one that ran to the limit loses its last frame
(no next observation to bootstrap from). Demo rewards are sparse success only.

Settings: :class:`~robopolicy.rl.config.ResidualArgs`; the loop (collection, updates,
evaluation, checkpoints): :mod:`robopolicy.rl.loop`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy.data.reader import EpisodeArrays, dataset_spec, load_arrays, open_dataset, read_robopolicy_meta
from robopolicy.errors import RobopolicyError
from robopolicy.rl import loop
from robopolicy.rl.config import ResidualArgs
from robopolicy.rl.envs import ChunkRunner, check_policy_fits_env, close_vector_env, make_vector_env
from robopolicy.rl.networks import CriticEnsemble, ObservationFlattener, min_over_subset
from robopolicy.rl.policy import ResidualPolicy, is_residual_checkpoint, load_residual_policy, make_residual_policy
from robopolicy.rl.replay import Batch, ReplayBuffer
from robopolicy.spec import ACTION
from robopolicy.train.checkpoint import load_policy, save_policy
from robopolicy.inference import TorchChunkPredictor
from robopolicy.train.evaluate import env_kwargs
from robopolicy.train.optim import adamw, polyak_update
from robopolicy.train.windows import build_windows


def critic_step(critic: CriticEnsemble, target_critic: CriticEnsemble, optimizer: torch.optim.Optimizer,
                inputs: tuple[torch.Tensor, ...], target: torch.Tensor, tau: float) -> dict[str, float]:
    """One regression step of every ensemble member towards ``target [B]``, then Polyak targets."""
    q = critic(*inputs)
    loss = (q - target).square().mean(dim=1).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    polyak_update(target_critic, critic, tau)
    return {"critic_loss": loss.item() / q.shape[0], "q_mean": q.mean().item()}


class ResidualAgent:
    """TD3-style learner of the residual actor of ``policy``."""

    def __init__(self, policy: ResidualPolicy, args: ResidualArgs) -> None:
        self.policy, self.args, self.device = policy, args, args.torch_device()
        self.actor = policy.to(self.device).actor
        self.actor.requires_grad_(True)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.features: ObservationFlattener = self.actor.obs
        da = policy.spec.action.dim
        self.critic = CriticEnsemble(args.num_critics, self.features.dim + 2 * da, args.critic_hidden).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optim = adamw(self.actor.net.parameters(), lr=args.lr_actor)
        self.critic_optim = adamw(self.critic.parameters(), lr=args.lr_critic)
        self.last_actor: dict[str, float] = {}

    def q_inputs(self, state: torch.Tensor, base: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.features
        return f.normalize_state(state), f.normalize_action(base), f.normalize_action(action)

    @torch.no_grad()
    def act(self, state: torch.Tensor, base: torch.Tensor, explore: bool, warmup: bool) -> torch.Tensor:
        state, base = state.to(self.device), base.to(self.device)
        residual = torch.zeros_like(base) if warmup else self.actor.residual(state, base)
        if explore:
            residual = (residual + self.args.explore_noise * torch.randn_like(residual)).clamp(-1.0, 1.0)
        return self.actor.with_residual(base, residual).cpu()

    def update(self, batch: Batch, update_actor: bool) -> dict[str, float]:
        a = self.args
        batch = Batch(*(t.to(self.device, non_blocking=True) for t in batch))
        with torch.no_grad():
            noise = a.target_noise * torch.randn_like(batch.next_base)
            noise = noise.clamp(-a.target_noise_clip, a.target_noise_clip)
            next_residual = (self.actor_target.residual(batch.next_state, batch.next_base) + noise).clamp(-1.0, 1.0)
            next_action = self.actor_target.with_residual(batch.next_base, next_residual)
            q_next = min_over_subset(self.critic_target(*self.q_inputs(batch.next_state, batch.next_base, next_action)),
                                     a.critic_subset)
            target = batch.reward + batch.discount * q_next
        metrics = critic_step(self.critic, self.critic_target, self.critic_optim,
                              self.q_inputs(batch.state, batch.base, batch.action), target, a.tau)
        if update_actor:
            residual = self.actor.residual(batch.state, batch.base)
            self.critic.requires_grad_(False)  # gradients flow through the critic, not into it
            q = self.critic(*self.q_inputs(batch.state, batch.base, self.actor.with_residual(batch.base, residual)))
            self.critic.requires_grad_(True)
            loss = -q.mean() + a.residual_penalty * residual.square().mean()
            self.actor_optim.zero_grad(set_to_none=True)
            loss.backward()
            self.actor_optim.step()
            polyak_update(self.actor_target, self.actor, a.tau)
            self.last_actor = {"actor_loss": loss.item(), "residual_abs": residual.abs().mean().item()}
        return {**metrics, **self.last_actor}

    def predictor(self) -> TorchChunkPredictor:
        return TorchChunkPredictor(self.policy, seed=self.args.eval_seed)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"actor": self.actor, "actor_target": self.actor_target,
                "critic": self.critic, "critic_target": self.critic_target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optim, "critic": self.critic_optim}


def demo_base_actions(base: torch.nn.Module, arrays: EpisodeArrays, seed: int, batch_size: int = 256) -> np.ndarray:
    """``[N, Da]``: the base's action at every demo frame, executing chunks from each episode start."""
    spec = base.spec
    windows = build_windows(arrays, spec.n_obs_steps, spec.horizon).obs  # [N, To] frame indices
    offset = np.concatenate([np.arange(e - s) for s, e in zip(arrays.episode_starts, arrays.episode_ends)])
    in_chunk = offset % spec.n_action_steps
    starts = np.flatnonzero(in_chunk == 0)
    generator, device = torch.Generator().manual_seed(seed), next(base.parameters()).device
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(starts), batch_size):
            frames = starts[i:i + batch_size]
            obs: dict[str, Any] = {k: torch.from_numpy(arrays.data[k][windows[frames]]).to(device)
                                   for k in spec.observation_keys}
            obs["task"] = [arrays.tasks[j] for j in arrays.task_index[frames]] if arrays.tasks else []
            noise = torch.randn(base.noise_shape(len(frames)), generator=generator).to(device)
            chunks.append(base.predict_chunk(obs, noise).cpu().numpy())
    return np.concatenate(chunks)[np.cumsum(in_chunk == 0) - 1, in_chunk]


def load_demo_buffer(path: Path, policy: ResidualPolicy, seed: int) -> ReplayBuffer:
    """The demonstrations at ``path`` as replay transitions (see the module docstring)."""
    ds = open_dataset(Path(path))
    spec = policy.spec
    dataset_spec(ds).check_compatible(spec, f"demonstrations {path}", "the base policy",
                                      keys=spec.observation_keys + [ACTION], check_fps=True)
    arrays = load_arrays(ds, spec.observation_keys + [ACTION])
    base = demo_base_actions(policy.base, arrays, seed)
    features = policy.actor.obs
    state = features.flatten({k: torch.from_numpy(arrays.data[k]) for k in features.keys}).numpy()
    action = arrays.data[ACTION]
    limit = read_robopolicy_meta(Path(path)).get("max_episode_steps")
    lengths = arrays.episode_ends - arrays.episode_starts
    succeeded = np.ones(len(lengths), bool) if limit is None else lengths < int(limit)
    usable = np.where(succeeded, lengths, lengths - 1)
    buffer = ReplayBuffer(int(usable.sum()), state.shape[1], action.shape[1], num_streams=len(lengths))
    for k in range(int(usable.max())):
        eps = np.flatnonzero(usable > k)
        t = arrays.episode_starts[eps] + k
        last = k == lengths[eps] - 1  # only reached by successful episodes
        nxt = np.where(last, t, t + 1)
        buffer.add(state[t], base[t], action[t], last.astype(np.float32), state[nxt],
                   np.where(last[:, None], 0.0, base[nxt]), last, k == usable[eps] - 1, streams=eps)
    return buffer


def finetune(args: ResidualArgs) -> dict[str, Any]:
    """Fine-tune a residual actor on ``args.checkpoint``'s policy; writes a run folder at ``args.out``."""
    return loop.train(build(args))


def build(args: ResidualArgs) -> loop.Setup:
    """Load the base (or the run to resume), start the envs, check they fit, load the demos."""
    args.validate()
    torch.manual_seed(args.seed)
    if args.resume:  # the run's own checkpoint holds the base: the same one, even if its folder moved
        policy = load_residual_policy(args.out)
        base_meta = policy.checkpoint_meta["base"]
    else:
        if is_residual_checkpoint(args.checkpoint):
            raise RobopolicyError(f"{args.checkpoint} is already a residual fine-tuning; fine-tune from a BC policy")
        base = load_policy(Path(args.checkpoint))
        da = base.spec.action.dim
        policy = make_residual_policy(base, args.action_scale, args.actor_hidden, (-1.0,) * da, (1.0,) * da)
        base_meta = {**base.checkpoint_meta, "checkpoint": str(Path(args.checkpoint).resolve())}
    env_name = args.env or base_meta.get("env")
    if not env_name:
        raise RobopolicyError("--env is required: the base policy does not record which env its data came from")
    envs = make_vector_env(env_name, args.num_envs, {**env_kwargs(policy.spec, args.randomize, args.max_episode_steps),
                                                     "dense_reward": args.dense_reward}, args.vector)
    try:
        check_policy_fits_env(policy.spec, envs, env_name, f"base policy {base_meta['checkpoint']}")
        low, high = envs.single_action_space.low, envs.single_action_space.high
        policy.actor.action_low.copy_(torch.as_tensor(low))
        policy.actor.action_high.copy_(torch.as_tensor(high))
        policy.config.action_low, policy.config.action_high = tuple(map(float, low)), tuple(map(float, high))
        agent = ResidualAgent(policy, args)
        demos = None
        if args.demo_fraction > 0:
            demo_path = args.demos or (base_meta.get("dataset") or {}).get("path")
            if not demo_path:
                raise RobopolicyError("--demos is required: the base policy does not record its dataset")
            demos = load_demo_buffer(Path(demo_path), policy, args.seed)
    except BaseException:
        close_vector_env(envs, failed=True)
        raise
    online = ReplayBuffer(args.buffer_size or args.steps, agent.features.dim, policy.spec.action.dim,
                          num_streams=args.num_envs)

    def write_policy(folder: Path, state: loop.RunState) -> None:
        base_info = {k: base_meta.get(k) for k in ("type", "env", "dataset", "step", "checkpoint")}
        extra = {"env": env_name, "base": base_info,
                 "rl": {"algorithm": "residual", "env_steps": state.env_steps, "randomize": args.randomize,
                        "dense_reward": args.dense_reward},
                 "dataset": base_meta.get("dataset")}
        save_policy(folder, policy, policy.state_dict(), extra)

    return loop.Setup(
        args=args, env_name=env_name, envs=envs, agent=agent, features=agent.features, online=online, demos=demos,
        runner=ChunkRunner(policy.base, args.num_envs, args.seed), write_policy=write_policy, label="residual",
        extra_log={"base_checkpoint": base_meta["checkpoint"], "demo_transitions": len(demos) if demos else 0},
    )
