"""Configuration of the VLA-style policy (language + vision + state -> flow-matching action chunks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from robopolicy.errors import RobopolicyError
from robopolicy.policies.flow.config import FlowConfig


@dataclass
class VLAConfig(FlowConfig):
    """The flow policy's action expert under a vision-language transformer; sizes fit a 2-core CPU.

    Prefix tokens: ``language_tokens`` from the frozen sentence embedding of the
    instruction, about ``image_token_grid ** 2`` per camera and observation step from a
    trained patch embedding (widths ``image_channels``, two), one per step from the low-dim
    state, and a readout token. A bidirectional transformer (``depth`` blocks of width
    ``dim``) encodes them once per chunk. The expert is the flow policy's FiLM U-Net
    (``down_dims`` ...; rectified flow, ``num_inference_steps`` Euler steps,
    ``time_sampling``), conditioned on the readout output, the instruction and the state
    (through ``state_mlp_dims``). ``image_keypoints`` / ``image_feature_dim`` are unused.
    """

    type: ClassVar[str] = "vla"
    # Measured: 16 minutes at batch 64 on this 2-core CPU, one camera (README). Of 2000 / 3000 /
    # 6000 steps on the 150-demo multitask set, 3000 did best: 79 / 88 / 87 successes of 100.
    train_steps: ClassVar[int] = 3000
    # Re-plan every 2 actions (0.2 s at 10 fps) of the 16 predicted: pushing a block onto a
    # 3 cm disc needs the feedback. Same checkpoints, 100 episodes: with the camera, 52/100
    # executing 8 actions per chunk and 88/100 with 2; state-only, 45 / 64 / 75 / 73 of 100
    # with 8 / 4 / 2 / 1.
    n_action_steps: int = 2
    down_dims: tuple[int, ...] = (48, 96, 192)
    image_channels: tuple[int, ...] = (32, 64)
    crop_ratio: float = 0.875
    dim: int = 128
    heads: int = 4
    depth: int = 3
    mlp_ratio: int = 4
    dropout: float = 0.0
    language_tokens: int = 2
    image_token_grid: int = 4
    # Feed observation.environment_state (object poses from the sim, as the diffusion / flow
    # policies do) besides observation.state. False: camera + proprioception only, what a
    # robot without an object tracker has.
    use_environment_state: bool = True
    # With two or more training instructions, the state token and the state MLP see, of the
    # environment state, only the instructed object (the one among objects named
    # ``<object>.<field>`` with the same fields whose name the instruction's embedding
    # matches, see policies/vla/objects.py) and the features of no such object.
    select_object: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        problems: list[str] = []
        if self.dim < 8 or self.heads < 1 or self.dim % self.heads:
            problems.append(f"dim {self.dim} must be >= 8 and divisible by heads={self.heads}")
        for name in ("depth", "mlp_ratio", "language_tokens", "image_token_grid"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.image_channels) != 2:
            problems.append(f"image_channels {self.image_channels} must be two widths (the patch embedding's convs)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout {self.dropout} must be in [0, 1)")
        if problems:
            raise RobopolicyError("invalid vla policy config: " + "; ".join(problems))
