"""Settings of the off-policy learners as typed dataclasses (no torch import: the CLI builds flags from them).

:class:`OffPolicyArgs` holds what every learner shares (env, budget, TD learning, logging);
:class:`ResidualArgs` (``robopolicy finetune``) and :class:`SACArgs` (the baseline) add
their own. ``validate`` turns bad values into one :class:`RobopolicyError` listing them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from robopolicy.errors import RobopolicyError
from robopolicy.seeds import EVAL_SEED

if TYPE_CHECKING:
    import torch

VectorMode = Literal["async", "sync"]


@dataclass(kw_only=True)
class OffPolicyArgs:
    """Settings every off-policy run shares (env, budget, TD learning, logging)."""

    env: str | None = None  # task name; default: the env the base policy's data came from
    out: Path = Path("outputs/finetune")
    steps: int = 200_000  # environment steps, summed over envs
    num_envs: int = 4
    vector: VectorMode = "async"  # "async": worker processes (spawn); "sync": in-process
    randomize: bool = False  # domain randomization (Randomization.default_dr) in training and eval
    dense_reward: bool = False  # the task's shaped reward instead of sparse success
    max_episode_steps: int | None = None
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N: networks and the base policy
    resume: bool = False
    # replay and TD learning
    buffer_size: int | None = None  # default: ``steps`` (keep every transition)
    batch_size: int = 256
    gamma: float = 0.99
    n_step: int = 3
    tau: float = 0.005
    utd: float = 1.0  # gradient updates per environment step
    num_critics: int = 2
    critic_subset: int = 2  # target = min over a random subset of this many critics (REDQ)
    critic_hidden: tuple[int, ...] = (256, 256)
    actor_hidden: tuple[int, ...] = (256, 256)
    lr_critic: float = 3e-4
    lr_actor: float = 3e-4
    learning_starts: int = 2_000  # env steps collected before the first update
    actor_starts: int = 5_000  # env steps before the actor learns (critic warm-up in between)
    actor_delay: int = 2  # one actor update per this many critic updates
    demo_fraction: float = 0.0  # share of every batch drawn from the demonstrations
    # evaluation and logging
    eval_every: int = 10_000  # env steps between evaluations (0: only at start and end)
    eval_episodes: int = 20
    eval_seed: int = EVAL_SEED
    save_every: int = 10_000
    log_every: int = 1_000
    log_window: int = 50  # training episodes in the running success rate
    progress: bool = True

    def validate(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("steps", "num_envs", "batch_size", "n_step", "num_critics", "critic_subset",
                                 "actor_delay", "save_every", "log_every", "log_window")
                    if getattr(self, name) < 1]
        if not 1 <= self.critic_subset <= self.num_critics:
            problems.append(f"critic_subset {self.critic_subset} must be in [1, num_critics={self.num_critics}]")
        if not 0.0 <= self.demo_fraction < 1.0:
            problems.append(f"demo_fraction must be in [0, 1), got {self.demo_fraction}")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 < self.tau <= 1.0:
            problems.append(f"gamma ({self.gamma}) and tau ({self.tau}) must be in (0, 1]")
        if self.utd <= 0 or min(self.eval_every, self.eval_episodes, self.learning_starts, self.actor_starts) < 0:
            problems.append("utd must be > 0; eval_every, eval_episodes, learning_starts, actor_starts >= 0")
        if self.vector not in ("async", "sync"):
            problems.append(f"vector must be 'async' or 'sync', got {self.vector!r}")
        if problems:
            raise RobopolicyError("invalid RL settings: " + "; ".join(problems))
        if not self.resume and (Path(self.out) / "checkpoints" / "last").exists():
            raise RobopolicyError(f"{self.out} already holds a run; pass --resume to continue it "
                                  "or choose another --out")

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(kw_only=True)
class ResidualArgs(OffPolicyArgs):
    """``robopolicy finetune`` settings (those every learner shares: :class:`OffPolicyArgs`)."""

    checkpoint: Path | None = None  # the frozen BC policy (run folder or checkpoint); not needed to resume
    demos: Path | None = None  # demonstrations for replay; default: the base's training dataset
    demo_fraction: float = 0.5
    action_scale: float = 0.2  # largest residual per action dim (env action units)
    explore_noise: float = 0.2  # Gaussian exploration std on the residual, in units of action_scale
    target_noise: float = 0.2  # TD3 target policy smoothing std, in units of action_scale
    target_noise_clip: float = 0.5
    # Conservative actor: a pull towards the base (actor loss += residual_penalty * mean(residual^2),
    # residual in tanh units) and a slower actor keep the critic's errors from dragging the policy
    # away from the base before Q is informative (without them lift dropped 45 % -> 35 % early on).
    residual_penalty: float = 0.1
    lr_actor: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.checkpoint is None and not self.resume:
            raise RobopolicyError("--checkpoint (the BC policy to fine-tune) is required")
        if self.action_scale <= 0 or min(self.explore_noise, self.target_noise, self.target_noise_clip,
                                         self.residual_penalty) < 0:
            raise RobopolicyError("action_scale must be > 0; the noise settings and residual_penalty >= 0")
        if self.dense_reward and self.demo_fraction > 0:
            raise RobopolicyError("demonstrations carry sparse success rewards only: with --dense-reward "
                                  "pass --demo-fraction 0")


@dataclass(kw_only=True)
class SACArgs(OffPolicyArgs):
    """SAC settings; ``stats_from`` is the policy checkpoint whose feature spec normalizes observations."""

    stats_from: Path
    init_alpha: float = 0.1
    learning_starts: int = 5_000
    actor_starts: int = 0
    actor_delay: int = 1
