"""Sample efficiency: residual RL on a BC policy vs SAC from scratch, same env-step budget.

Both learners run in this process, one after the other, on the same task, observations
(low-dim features, normalized with the base policy's statistics), reward (sparse success),
critic ensemble, replay, n-step returns, update-to-data ratio and evaluation (the real
evaluator, same seeds, deterministic policies). Residual RL also gets the BC policy and its
demonstrations; SAC gets neither. Prints success rate vs env steps for both, and the env
steps each needs to reach the base policy's success and a target above it.

Without ``--checkpoint`` a weak base is built first (50 push demos, 1000 diffusion training
steps: ~8 % success here; BC on push is hard). Writes ``<out>/sample_efficiency.{json,png}``.

    python bench/rl_sample_efficiency.py                      # quick default on push (minutes)
    python bench/rl_sample_efficiency.py --steps 50000 --eval-every 5000
    python bench/rl_sample_efficiency.py --checkpoint RUN --env lift --steps 200000 --num-envs 4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from robopolicy.process_defaults import apply_defaults

apply_defaults()  # before mujoco / torch / lerobot are imported

from robopolicy.atomic_io import write_json_atomic  # noqa: E402
from robopolicy.rl import ResidualArgs, SACArgs, finetune, train_sac  # noqa: E402
from robopolicy.rl.curves import plot_learning_curves  # noqa: E402


def weak_push_base(root: Path) -> Path:
    """A weak diffusion policy on push: 50 demos, short training (reused if present)."""
    from robopolicy.data.collect import CollectConfig, collect
    from robopolicy.train.trainer import TrainConfig, train

    run = root / "base"
    if (run / "checkpoints" / "last").exists():
        return run
    if not (root / "demos").exists():
        collect(CollectConfig(env="push", episodes=50, out=root / "demos", seed=0))
    train(TrainConfig(policy="diffusion", dataset=root / "demos", out=run, steps=1000, save_every=1000,
                      policy_overrides={"down_dims": [32, 64, 128], "num_inference_steps": 4}))
    return run


def first_step_reaching(history: list[list[float]], level: float) -> int | None:
    """Env steps of the first evaluation at or above ``level`` (None if never)."""
    return next((int(step) for step, success in history if success >= level - 1e-9), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="BC run to fine-tune (default: build a weak push base)")
    p.add_argument("--env", help="task (default: the base's)")
    p.add_argument("--steps", type=int, default=15_000, help="env steps for each learner")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--vector", choices=["async", "sync"], default="sync",
                   help="sync suits the fast own-MJCF tasks; async (worker processes) suits robosuite")
    p.add_argument("--eval-every", type=int, default=2_500)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--utd", type=float, default=1.0)
    p.add_argument("--randomize", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_rl"))
    args = p.parse_args()

    base = args.checkpoint or weak_push_base(args.out)
    common: dict[str, Any] = dict(
        env=args.env, steps=args.steps, num_envs=args.num_envs, vector=args.vector, eval_every=args.eval_every,
        eval_episodes=args.eval_episodes, utd=args.utd, randomize=args.randomize, seed=args.seed,
        save_every=max(args.steps, 1))
    results = {}
    for label, run in (("residual", lambda out: finetune(ResidualArgs(checkpoint=base, out=out, **common))),
                       ("sac", lambda out: train_sac(SACArgs(stats_from=base, out=out, **common)))):
        out = args.out / label
        shutil.rmtree(out, ignore_errors=True)
        results[label] = {"summary": run(out), "log": out / "log.json"}

    histories = {label: json.loads(r["log"].read_text())["history"] for label, r in results.items()}
    base_success = histories["residual"]["eval"][0][1]
    target = min(base_success + 0.3, 0.95)
    steps = sorted({row[0] for h in histories.values() for row in h["eval"]})
    by_step = {label: {row[0]: row[1] for row in h["eval"]} for label, h in histories.items()}
    env = results["residual"]["summary"]["env"]
    print(f"\n{env}: success rate vs env steps (eval: {args.eval_episodes} episodes, fixed seeds)")
    print(f"{'env steps':>10} {'residual':>9} {'sac':>9}")
    for step in steps:
        cells = [f"{by_step[k][step]:>9.0%}" if step in by_step[k] else f"{'-':>9}" for k in ("residual", "sac")]
        print(f"{step:>10} {' '.join(cells)}")
    reach = {label: {"base": first_step_reaching(h["eval"], base_success),
                     "target": first_step_reaching(h["eval"], target)} for label, h in histories.items()}
    print(f"\nenv steps to reach the base's success ({base_success:.0%}) / the target ({target:.0%}):")
    for label in ("residual", "sac"):
        print(f"  {label:<9} {reach[label]['base'] if reach[label]['base'] is not None else 'never':>8} / "
              f"{reach[label]['target'] if reach[label]['target'] is not None else 'never'}")
    for label, r in results.items():
        t = r["summary"]["throughput"]
        print(f"  {label:<9} {t['env_steps_per_s']:.0f} env steps/s (sim {t['share_sim']:.0%}, base "
              f"{t['share_base']:.0%}, updates {t['share_update']:.0%}); eval {t['eval_seconds']:.0f} s")
    write_json_atomic(args.out / "sample_efficiency.json", {
        "env": env, "steps": args.steps, "base_success": base_success, "target": target, "reach": reach,
        "summaries": {k: r["summary"] for k, r in results.items()}, "histories": histories})
    plot_learning_curves(histories, args.out / "sample_efficiency.png",
                         title=f"residual RL vs SAC from scratch on {env}")
    print(f"wrote {args.out / 'sample_efficiency.png'} and {args.out / 'sample_efficiency.json'}")


if __name__ == "__main__":
    main()
