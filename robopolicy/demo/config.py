"""What a demo run does: the task, where it writes, and how much work each stage gets.

:data:`DEFAULT` fits the whole pipeline on lift into < 30 min on a quiet 2-core CPU
(collect ~1-2 min, BC ~10 min, three evaluations ~1 min each, RL ~8 min at ~40 env
steps/s with 4 envs, export ~1 min, ROS 2 deploy ~1-2 min); :data:`QUICK` is the CI size,
a few minutes, that still runs every stage for real.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_ENV = "lift"


@dataclass(frozen=True)
class Budget:
    """How much work each stage does."""

    demos: int  # collect: scripted-expert episodes kept
    train_steps: int  # train: BC gradient steps
    eval_episodes: int  # eval_bc, eval_rl, eval_export
    video_episodes: int  # eval_export: episodes in the rollout video
    rl_steps: int  # finetune: env steps, summed over the envs
    rl_envs: int
    rl_learning_starts: int  # env steps before the first update
    rl_actor_starts: int  # env steps before the residual actor learns
    rl_eval_every: int  # env steps between the learning curve's evaluations (0: start and end)
    rl_eval_episodes: int
    deploy_episodes: int  # deploy: episodes over ROS 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT = Budget(demos=50, train_steps=4000, eval_episodes=50, video_episodes=3, rl_steps=15_000, rl_envs=4,
                 rl_learning_starts=2_000, rl_actor_starts=5_000, rl_eval_every=5_000, rl_eval_episodes=10,
                 deploy_episodes=10)
QUICK = Budget(demos=10, train_steps=300, eval_episodes=5, video_episodes=1, rl_steps=1_200, rl_envs=4,
               rl_learning_starts=400, rl_actor_starts=800, rl_eval_every=0, rl_eval_episodes=3,
               deploy_episodes=2)


@dataclass
class DemoConfig:
    """``robopolicy demo`` options."""

    quick: bool = False
    fresh: bool = False  # redo every stage instead of reusing finished ones
    stage: str | None = None  # re-run only this stage (and any unfinished stage it needs)
    out: Path = Path("outputs/demo")
    env: str = DEFAULT_ENV

    @property
    def budget(self) -> Budget:
        return QUICK if self.quick else DEFAULT

    def folder(self, stage: str) -> Path:
        """Where ``stage`` writes its results (and its ``done.json``)."""
        return self.out / stage

    @property
    def report_dir(self) -> Path:
        return self.out / "report"
