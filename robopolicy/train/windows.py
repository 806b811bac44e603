"""Training windows over in-memory episodes, gathered with vectorized indexing.

For a frame ``t`` of an episode the policy sees observations ``t-To+1 .. t`` and learns
actions ``t-To+1 .. t-To+Tp`` (Chi et al.). Indices before the episode start repeat the
first frame; actions past its end repeat the last action and are flagged in
``action_is_pad`` so the loss ignores them. All index arrays are computed once; a batch
is one fancy-index per feature (microseconds), so the model never waits for data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from robopolicy.data.reader import EpisodeArrays
from robopolicy.spec import ACTION


@dataclass
class WindowIndex:
    obs: np.ndarray  # [N, To] frame indices
    action: np.ndarray  # [N, Tp] frame indices
    action_is_pad: np.ndarray  # [N, Tp] bool
    task: np.ndarray  # [N] task index


def build_windows(arrays: EpisodeArrays, n_obs_steps: int, horizon: int) -> WindowIndex:
    """One window per frame of every episode."""
    obs, act, pad, task = [], [], [], []
    for start, end in zip(arrays.episode_starts, arrays.episode_ends):
        t = np.arange(start, end)
        o = t[:, None] + np.arange(-n_obs_steps + 1, 1)[None, :]
        a = t[:, None] + np.arange(-n_obs_steps + 1, horizon - n_obs_steps + 1)[None, :]
        obs.append(np.clip(o, start, end - 1))
        pad.append(a >= end)
        act.append(np.clip(a, start, end - 1))
        task.append(arrays.task_index[start:end])
    return WindowIndex(np.concatenate(obs), np.concatenate(act), np.concatenate(pad), np.concatenate(task))


class WindowSampler:
    """Samples random training batches of windows as torch tensors."""

    def __init__(
        self, arrays: EpisodeArrays, obs_keys: list[str], n_obs_steps: int, horizon: int, seed: int, rank: int = 0
    ) -> None:
        self.arrays = arrays
        self.obs_keys = obs_keys
        self.index = build_windows(arrays, n_obs_steps, horizon)
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays.data[k])) for k in obs_keys + [ACTION]}
        self.rng = np.random.default_rng([seed, rank])

    def __len__(self) -> int:
        return len(self.index.obs)

    def batch(self, batch_size: int) -> dict[str, torch.Tensor | list[str]]:
        rows = self.rng.integers(0, len(self), size=batch_size)
        return self.gather(rows)

    def gather(self, rows: np.ndarray) -> dict[str, torch.Tensor | list[str]]:
        obs_idx = torch.from_numpy(self.index.obs[rows])
        out: dict[str, torch.Tensor | list[str]] = {
            k: self.tensors[k][obs_idx] for k in self.obs_keys
        }
        out[ACTION] = self.tensors[ACTION][torch.from_numpy(self.index.action[rows])]
        out["action_is_pad"] = torch.from_numpy(self.index.action_is_pad[rows])
        out["task"] = [self.arrays.tasks[i] for i in self.index.task[rows]] if self.arrays.tasks else []
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

