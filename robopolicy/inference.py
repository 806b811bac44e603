"""The inference contract: what evaluation, deployment and fine-tuning need from a policy.

A :class:`ChunkPredictor` turns raw observations into a chunk of raw actions. Two kinds
satisfy it: a torch policy wrapped by :class:`TorchChunkPredictor`, and an exported one
(``robopolicy.export.load_policy``, with one of :data:`BACKENDS`). The evaluator
(``robopolicy.train.evaluate``), the ROS policy node (``robopolicy.real``) and residual RL
(``robopolicy.rl``) all depend on this module, not on each other. Importing it does not
import torch (the ROS node's configuration imports :data:`BACKENDS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from robopolicy.spec import FeatureSpec

if TYPE_CHECKING:
    import torch

#: The backends an exported policy runs on (``robopolicy.export.load_policy(path, backend)``).
BACKENDS = ("onnxruntime", "tensorrt", "torch")


class ChunkPredictor(Protocol):
    """What the evaluator (and the ROS node) needs from a policy."""

    spec: FeatureSpec

    def predict_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Raw observations ``[1, To, ...]`` (+ ``"task"``) -> raw actions ``[1, Ta, Da]``."""
        ...

    # Optional: ``correct_action(obs, action) -> action`` with the current raw observation
    # (unbatched) and the planned action ``[Da]`` (the chunk's dtype, float32); the executor
    # applies it at every step (a torch residual policy, or an exported one:
    # ``robopolicy.export.ExportedResidualPolicy``).


class TorchChunkPredictor:
    """Runs a torch :class:`~robopolicy.policies.base.Policy` on numpy observations."""

    def __init__(self, policy: torch.nn.Module, seed: int = 0) -> None:
        import torch

        self.policy = policy.eval()
        self.spec = policy.spec
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.source_env = getattr(policy, "checkpoint_meta", {}).get("env")

    def predict_chunk(self, obs: dict[str, Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            batch = {k: torch.as_tensor(v, device=self.device) if k != "task" else v for k, v in obs.items()}
            noise = torch.randn(self.policy.noise_shape(1), generator=self.generator).to(self.device)
            return self.policy.predict_chunk(batch, noise).cpu().numpy()

    def correct_action(self, obs: dict[str, np.ndarray], action: np.ndarray) -> np.ndarray:
        """The policy's per-step correction of the planned ``action`` (identity for plain policies)."""
        import torch

        correct = getattr(self.policy, "correct_action", None)
        if correct is None:
            return action
        with torch.inference_mode():
            batch = {k: torch.as_tensor(v, device=self.device)[None] for k, v in obs.items()}
            return correct(batch, torch.as_tensor(action, device=self.device)[None]).cpu().numpy()[0]
