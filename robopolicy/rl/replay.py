"""Replay of one-step transitions with n-step returns computed at sample time.

Each stored transition is ``(state, base, action, reward, next_state, next_base,
terminated, episode_end)`` plus a pointer to the following transition of the same
episode (``-1`` until that one is stored, or when the episode ended). Sampling walks
these pointers up to ``n`` steps: ``R = sum_k gamma^k r_k`` stops at a terminal, at an
episode end (time limit) or where the next transition is not stored (yet), and the
target bootstraps from the last reached ``next_state`` with discount ``gamma^steps``
(0 after a terminal). The flat ring with per-transition pointers serves interleaved
vector-env streams and contiguous demonstrations alike; as the ring overwrites in
insertion order, a live transition never points at an overwritten one.

``state`` is the raw low-dim observation vector, ``base`` the frozen base policy's action
at that state and ``action`` the executed one (base + residual, or a demonstrator's).
Buffers save to and load from safetensors (never pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from robopolicy.errors import CheckpointError

FIELDS = ("state", "base", "action", "reward", "next_state", "next_base", "terminated", "episode_end", "next_index")


class Batch(NamedTuple):
    """An n-step training batch (torch tensors, first dim ``B``)."""

    state: torch.Tensor  # [B, Ds] raw
    base: torch.Tensor  # [B, Da] raw base action at ``state``
    action: torch.Tensor  # [B, Da] executed action
    reward: torch.Tensor  # [B] discounted n-step reward sum
    next_state: torch.Tensor  # [B, Ds] state reached after the n (or fewer) steps
    next_base: torch.Tensor  # [B, Da] base action at ``next_state``
    discount: torch.Tensor  # [B] gamma^steps, 0 when a terminal was reached


class ReplayBuffer:
    """A ring of ``capacity`` transitions fed by ``num_streams`` parallel episode streams."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int, base_dim: int | None = None,
                 num_streams: int = 1) -> None:
        base_dim = action_dim if base_dim is None else base_dim
        self.capacity = int(capacity)
        self.state = np.zeros((capacity, state_dim), np.float32)
        self.base = np.zeros((capacity, base_dim), np.float32)
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.next_state = np.zeros((capacity, state_dim), np.float32)
        self.next_base = np.zeros((capacity, base_dim), np.float32)
        self.terminated = np.zeros(capacity, bool)
        self.episode_end = np.zeros(capacity, bool)
        self.next_index = np.full(capacity, -1, np.int64)
        self.pos = 0
        self.size = 0
        self.last = np.full(num_streams, -1, np.int64)  # latest index of each stream's open episode

    def __len__(self) -> int:
        return self.size

    def add(self, state: np.ndarray, base: np.ndarray, action: np.ndarray, reward: np.ndarray,
            next_state: np.ndarray, next_base: np.ndarray, terminated: np.ndarray, episode_end: np.ndarray,
            streams: np.ndarray | None = None) -> None:
        """Store one transition for each of ``M`` distinct streams (arrays ``[M, ...]``; default streams ``0..M-1``)."""
        m = len(reward)
        streams = np.arange(m) if streams is None else np.asarray(streams)
        if len(np.unique(streams)) != m:
            raise ValueError("one add() takes at most one transition per stream")
        idx = (self.pos + np.arange(m)) % self.capacity
        for name, value in (("state", state), ("base", base), ("action", action), ("reward", reward),
                            ("next_state", next_state), ("next_base", next_base),
                            ("terminated", terminated), ("episode_end", episode_end)):
            getattr(self, name)[idx] = value
        self.next_index[idx] = -1
        prev = self.last[streams]
        linked = prev >= 0
        self.next_index[prev[linked]] = idx[linked]
        ended = np.asarray(episode_end, bool) | np.asarray(terminated, bool)
        self.last[streams] = np.where(ended, -1, idx)
        self.pos = int((self.pos + m) % self.capacity)
        self.size = min(self.size + m, self.capacity)

    def cut_streams(self) -> None:
        """Forget open episodes (after a reset that abandons them): they bootstrap where they stop."""
        self.last[:] = -1

    def sample(self, batch_size: int, n_step: int, gamma: float, rng: np.random.Generator) -> Batch:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self.gather(rng.integers(0, self.size, size=batch_size), n_step, gamma)

    def gather(self, idx: np.ndarray, n_step: int, gamma: float) -> Batch:
        """The n-step batch starting at transitions ``idx``."""
        cur, last = idx.copy(), idx.copy()
        ret = np.zeros(len(idx), np.float64)
        steps = np.zeros(len(idx), np.int64)
        active = np.ones(len(idx), bool)
        for k in range(n_step):
            ret += np.where(active, gamma**k * self.reward[cur], 0.0)
            steps += active
            last = np.where(active, cur, last)
            nxt = self.next_index[cur]
            active = active & ~self.terminated[cur] & ~self.episode_end[cur] & (nxt >= 0)
            cur = np.where(active, nxt, cur)
        discount = np.where(self.terminated[last], 0.0, gamma**steps)

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

        return Batch(t(self.state[idx]), t(self.base[idx]), t(self.action[idx]), t(ret),
                     t(self.next_state[last]), t(self.next_base[last]), t(discount))

    # ---- persistence (safetensors) ----------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the stored transitions and pointers (not atomic on its own)."""
        arrays = {name: np.ascontiguousarray(getattr(self, name)[: self.size]) for name in FIELDS}
        arrays["cursor"] = np.array([self.pos, self.size, self.capacity], np.int64)
        save_file(arrays, str(path))

    def load(self, path: Path) -> None:
        """Restore a buffer written by :meth:`save`, oldest transition first.

        The capacity may differ (a resumed run with a longer budget); a smaller one keeps
        the newest transitions.
        """
        try:
            arrays = load_file(str(path))
            pos, size, capacity = (int(v) for v in arrays["cursor"])
        except Exception as e:  # safetensors raises several types on damaged files
            raise CheckpointError(f"{path} is not a readable replay buffer ({e})") from e
        if not all(arrays[name].shape[1:] == getattr(self, name).shape[1:] for name in FIELDS):
            raise CheckpointError(
                f"{path} holds transitions of state {arrays['state'].shape[1:]}, action {arrays['action'].shape[1:]}; "
                f"this run needs state {self.state.shape[1:]}, action {self.action.shape[1:]}")
        oldest = pos if size == capacity else 0
        keep = min(size, self.capacity)
        order = (oldest + np.arange(size - keep, size)) % capacity
        for name in FIELDS[:-1]:
            getattr(self, name)[:keep] = arrays[name][order]
        nxt = arrays["next_index"][order]
        self.next_index[:keep] = np.where(nxt >= 0, (nxt - oldest) % capacity - (size - keep), -1)
        self.size, self.pos = keep, keep % self.capacity
        self.cut_streams()


def sample_mixed(online: ReplayBuffer, demos: ReplayBuffer | None, batch_size: int, demo_fraction: float,
                 n_step: int, gamma: float, rng: np.random.Generator) -> Batch:
    """``round(batch_size * demo_fraction)`` demo transitions + the rest online, concatenated."""
    n_demo = int(round(batch_size * demo_fraction)) if demos is not None and len(demos) else 0
    parts = [online.sample(batch_size - n_demo, n_step, gamma, rng)]
    if n_demo:
        parts.append(demos.sample(n_demo, n_step, gamma, rng))
    return Batch(*(torch.cat(fields) for fields in zip(*parts)))
