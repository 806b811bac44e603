"""Vectorized sim for RL: worker processes, the env/policy fit check, batched chunk execution.

* :func:`make_vector_env`: ``num_envs`` copies of a registered task, in worker processes
  started with ``spawn`` (never ``fork``: a forked child would inherit rclpy's SIGTERM
  handler and half-initialized MuJoCo/EGL state) or in-process (``vector="sync"``).
  Autoreset happens in the same step; the finished episode's last observation and info
  come in ``info["final_obs"]`` / ``info["final_info"]``.
* :class:`ChunkRunner`: receding-horizon execution of a frozen chunk policy over the
  vector (one batched ``predict_chunk`` for the envs whose plan ran out).
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from robopolicy.rl.config import VectorMode
from robopolicy.sim import make_env
from robopolicy.sim.registry import env_entry
from robopolicy.spec import FeatureSpec

def make_vector_env(name: str, num_envs: int, kwargs: dict[str, Any],
                    vector: VectorMode = "async") -> gym.vector.VectorEnv:
    """``num_envs`` copies of env ``name`` (built with ``kwargs``), autoresetting in the same step."""
    env_entry(name)  # unknown names fail here, before any worker starts
    fns = [functools.partial(make_env, name, **kwargs) for _ in range(num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if vector == "sync":
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=mode)


def close_vector_env(envs: gym.vector.VectorEnv, failed: bool = False) -> None:
    """Close the envs; after a failure (or Ctrl-C) terminate workers instead of waiting on them."""
    if failed and isinstance(envs, gym.vector.AsyncVectorEnv):
        envs.close(terminate=True)
    else:
        envs.close()


def check_policy_fits_env(spec: FeatureSpec, envs: gym.vector.VectorEnv, env_name: str, policy_side: str) -> None:
    """:class:`SpecMismatchError` naming both sides unless the policy's features and fps fit the env."""
    fps, names = float(envs.get_attr("fps")[0]), envs.get_attr("feature_names")[0]
    spec.check_fits_env(envs.single_observation_space, envs.single_action_space.shape[0], fps, names,
                        policy_side, f"env {env_name!r}")


def final_observations(obs: dict[str, np.ndarray], info: dict[str, Any], done: np.ndarray) -> dict[str, np.ndarray]:
    """The observation each env reached this step: ``info["final_obs"]`` where an episode ended."""
    if not done.any():
        return obs
    out = {k: v.copy() for k, v in obs.items()}
    for i in np.flatnonzero(done):
        for k in out:
            out[k][i] = info["final_obs"][i][k]
    return out


def step_success(info: dict[str, Any], done: np.ndarray) -> np.ndarray:
    """``is_success`` of the step just taken (from ``final_info`` where the env was reset)."""
    success = np.asarray(info["is_success"], bool).copy()
    if done.any():
        success[done] = np.asarray(info["final_info"]["is_success"], bool)[done]
    return success


class ChunkRunner:
    """Receding-horizon execution of a chunk policy over ``num_envs`` envs.

    Keeps each env's ``To``-frame observation history and its plan of ``Ta`` actions; a
    new chunk is predicted (batched over envs) when a plan runs out. ``act`` advances only
    the given envs, so the base action at an episode's final observation can be queried
    before that env's history is restarted.
    """

    def __init__(self, policy: torch.nn.Module, num_envs: int, seed: int) -> None:
        self.policy = policy
        spec: FeatureSpec = policy.spec
        self.keys = spec.observation_keys
        self.n_obs, self.n_act = spec.n_obs_steps, spec.n_action_steps
        self.history = {k: np.zeros((num_envs, self.n_obs, *spec.features[k].shape), np.uint8
                                    if spec.features[k].dtype == "uint8" else np.float32) for k in self.keys}
        self.plan = np.zeros((num_envs, self.n_act, spec.action.dim), np.float32)
        self.cursor = np.full(num_envs, self.n_act)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(policy.parameters()).device

    def act(self, obs: dict[str, np.ndarray], envs: np.ndarray, fresh: np.ndarray, tasks: list[str]) -> np.ndarray:
        """Base actions ``[M, Da]`` for ``envs`` given their new observations (``obs[k]`` is ``[M, ...]``).

        ``fresh`` marks envs whose episode starts with this observation (history and plan restart).
        """
        envs, fresh = np.asarray(envs), np.asarray(fresh, bool)
        for k in self.keys:
            h = self.history[k]
            h[envs] = np.where(fresh.reshape(-1, *[1] * (h.ndim - 1)), obs[k][:, None],
                               np.concatenate([h[envs, 1:], obs[k][:, None]], axis=1))
        self.cursor[envs[fresh]] = self.n_act
        need = envs[self.cursor[envs] >= self.n_act]
        if len(need):
            batch = {k: torch.as_tensor(self.history[k][need], device=self.device) for k in self.keys}
            batch["task"] = [tasks[int(np.flatnonzero(envs == i)[0])] for i in need]
            noise = torch.randn(self.policy.noise_shape(len(need)), generator=self.generator).to(self.device)
            with torch.inference_mode():
                self.plan[need] = self.policy.predict_chunk(batch, noise).cpu().numpy()
            self.cursor[need] = 0
        actions = self.plan[envs, self.cursor[envs]]
        self.cursor[envs] += 1
        return actions
