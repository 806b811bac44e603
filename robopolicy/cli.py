"""The ``robopolicy`` command: one subcommand per pipeline stage.

Bad input (paths, names, option values) ends in a one- or two-line ``error:`` message
and exit code 2; ``ROBOPOLICY_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from robopolicy.errors import RobopolicyError
from robopolicy.process_defaults import apply_defaults
from robopolicy.seeds import EVAL_SEED

Handler = Callable[[argparse.Namespace], int]


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in (s.strip() for s in value.split(",")) if v)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


# ---- collect ---------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    from robopolicy.data.collect import CollectConfig, collect

    cfg = CollectConfig(
        env=args.env, episodes=args.episodes, out=Path(args.out), cameras=args.cameras,
        image_size=args.image_size, seed=args.seed, keep_failures=args.keep_failures,
        overwrite=args.overwrite, randomize=args.randomize, use_videos=not args.images,
        commit_every_s=args.commit_every,
    )
    r = collect(cfg)
    status = "interrupted: " if r.interrupted else ""
    print(
        f"{status}kept {r.kept} episodes ({r.frames} frames) of {r.attempts} expert attempts "
        f"(expert success {r.success_rate:.0%}) in {r.seconds:.1f} s; "
        f"{cfg.out} now holds {r.total_episodes} episodes"
    )
    return 130 if r.interrupted else 0


def add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="record scripted-expert demonstrations as a LeRobotDataset")
    p.add_argument("--env", required=True, help="task name (see `robopolicy envs`): built in, from a plugin, "
                                                "robosuite:<Env> or module:Class; it needs a scripted expert")
    p.add_argument("--episodes", type=_positive_int, default=50, help="episodes to keep")
    p.add_argument("--out", required=True, help="dataset folder (appended to if it exists)")
    p.add_argument("--cameras", type=_csv, default=(), help="comma-separated camera names (default: state only)")
    p.add_argument("--image-size", type=_positive_int, default=84, help="square camera image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-failures", action="store_true", help="also keep episodes the expert failed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--randomize", action="store_true", help="collect under domain randomization")
    p.add_argument("--images", action="store_true", help="store camera frames as PNG images, not MP4 video")
    p.add_argument("--commit-every", type=float, default=10.0, metavar="SECONDS",
                   help="write finished episodes to disk at most this often; a kill loses at most the last "
                        "interval's episodes (0: commit every episode; default: %(default)s)")
    p.set_defaults(func=cmd_collect)


# ---- teleop ----------------------------------------------------------------------------
def cmd_teleop(args: argparse.Namespace) -> int:
    from robopolicy.data.teleop import TeleopConfig, teleop

    cfg = TeleopConfig(
        env=args.env, out=Path(args.out), episodes=args.episodes, cameras=args.cameras,
        image_size=args.image_size, seed=args.seed, overwrite=args.overwrite, randomize=args.randomize,
        use_videos=not args.images, keep_failures=args.keep_failures, joy=args.joy, keyboard=args.keyboard,
        speed=args.speed, key_step=args.key_step,
    )
    r = teleop(cfg)
    status = "quit: " if r.quit else ""
    print(f"{status}saved {r.saved} episodes ({r.frames} frames) of {r.attempts} started "
          f"({r.successes} successful) in {r.seconds:.1f} s; {cfg.out} now holds {r.total_episodes} episodes")
    return 0


def add_teleop(sub: argparse._SubParsersAction) -> None:
    from robopolicy.data.teleop_input import KEYBOARDS

    p = sub.add_parser("teleop", help="drive an env from the keyboard or a gamepad (sensor_msgs/Joy) and "
                                      "record the episodes as a LeRobotDataset")
    p.add_argument("--env", required=True, help="task name (see `robopolicy envs`): built in, from a plugin, "
                                                "robosuite:<Env> or module:Class")
    p.add_argument("--out", required=True, help="dataset folder (appended to if it exists)")
    p.add_argument("--episodes", type=_positive_int, default=10, help="episodes to save before stopping")
    p.add_argument("--cameras", type=_csv, default=(), help="comma-separated camera names to record "
                                                          "(default: state only; the window shows the scene)")
    p.add_argument("--image-size", type=_positive_int, default=84, help="square camera image size in pixels")
    p.add_argument("--joy", metavar="TOPIC", default=None,
                   help="also read a gamepad from this sensor_msgs/Joy topic (e.g. /joy)")
    p.add_argument("--keyboard", choices=KEYBOARDS, default="auto",
                   help="auto: an OpenCV window with the camera view where a display exists, else the "
                        "terminal; none: gamepad only (default: %(default)s)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="multiple of real time (1: the env's fps; 0: step as fast as inputs come)")
    p.add_argument("--key-step", type=float, default=None,
                   help="command change per key press, as a fraction of the half-range (default: 0.5 for "
                        "push, 0.25 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-failures", action="store_true", help="also save episodes that hit the time limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--randomize", action="store_true", help="teleoperate under domain randomization")
    p.add_argument("--images", action="store_true", help="store camera frames as PNG images, not MP4 video")
    p.set_defaults(func=cmd_teleop)


# ---- dataset ---------------------------------------------------------------------------
def cmd_dataset_info(args: argparse.Namespace) -> int:
    from robopolicy.data.summary import dataset_info

    print(dataset_info(Path(args.path)))
    return 0


def cmd_dataset_plot(args: argparse.Namespace) -> int:
    from robopolicy.data.summary import plot_episode

    for path in plot_episode(Path(args.path), args.episode, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _add_robot_dataset_args(p: argparse.ArgumentParser, overwrite_help: str) -> None:
    """The options `record` and `dataset import-bag` share: the robot's parameter file and the dataset written."""
    p.add_argument("--params", required=True,
                   help="the robot's policy-node parameter file (real/config/*.yaml): topics and joint maps")
    p.add_argument("--out", required=True, help="dataset folder (appended to if it exists)")
    p.add_argument("--fps", type=_positive_int, default=10, help="dataset frame rate (default: %(default)s)")
    p.add_argument("--task", default=None, help="task string (default: the parameter file's task, else "
                                                 "'demonstration')")
    p.add_argument("--image-size", default=None, metavar="N|HxW",
                   help="resize camera images to this size (default: each camera's own size)")
    p.add_argument("--images", action="store_true", help="store camera frames as PNG images, not MP4 video")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)


def _robot_dataset_config(args: argparse.Namespace) -> dict[str, object]:
    """The config fields of :func:`_add_robot_dataset_args`' options."""
    from robopolicy.data.bag_import import parse_image_size

    return {"params": Path(args.params), "out": Path(args.out), "fps": args.fps, "task": args.task,
            "image_size": parse_image_size(args.image_size) if args.image_size else None,
            "use_videos": not args.images, "overwrite": args.overwrite}


def cmd_dataset_import_bag(args: argparse.Namespace) -> int:
    from robopolicy.data.bag_import import BagImportConfig, import_bags

    r = import_bags(BagImportConfig(bags=[Path(b) for b in args.bags], **_robot_dataset_config(args)))
    print(f"imported {len(r.bags)} bag(s) as {len(r.bags)} episode(s), {r.frames} frames in {r.seconds:.1f} s; "
          f"{Path(args.out)} now holds {r.total_episodes} episodes, {r.total_frames} frames")
    return 0


def add_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="inspect a LeRobotDataset, or import rosbag2 recordings into one")
    dsub = p.add_subparsers(dest="dataset_cmd", required=True, metavar="{info,plot,import-bag}")
    info = dsub.add_parser("info", help="episodes, frames, fps, features, tasks, ranges")
    info.add_argument("path")
    info.set_defaults(func=cmd_dataset_info)
    plot = dsub.add_parser("plot", help="state and action over time (and a video of the frames)")
    plot.add_argument("path")
    plot.add_argument("--episode", type=int, default=0)
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.set_defaults(func=cmd_dataset_plot)
    bag = dsub.add_parser("import-bag", help="rosbag2 recordings (sqlite3 / MCAP) -> LeRobotDataset, one episode per bag")
    bag.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folder (or .mcap file)")
    _add_robot_dataset_args(bag, "replace an existing dataset at --out (once every bag imported)")
    bag.set_defaults(func=cmd_dataset_import_bag)


# ---- record ----------------------------------------------------------------------------
def cmd_record(args: argparse.Namespace) -> int:
    from robopolicy.real.record import RecordConfig, record

    cfg = RecordConfig(**_robot_dataset_config(args), domain_id=args.domain_id, topic_timeout_s=args.topic_timeout,
                       episodes=args.episodes)
    r = record(cfg)
    print(r.summary(cfg.out))
    return 130 if r.interrupted else 0


def add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record demonstrations on a robot over ROS 2 (observation topics + the "
                                      "commanded action) as a LeRobotDataset")
    _add_robot_dataset_args(p, "replace an existing dataset at --out (at the first save)")
    p.add_argument("--episodes", type=_positive_int, default=None,
                   help="stop after this many saved episodes (default: until q or Ctrl-C)")
    p.add_argument("--topic-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="every mapped topic must publish within this time (default: %(default)s)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: $ROS_DOMAIN_ID, else 0)")
    p.set_defaults(func=cmd_record)


# ---- train -----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from robopolicy.train.trainer import TrainConfig, parse_overrides, train

    cfg = TrainConfig(
        policy=args.policy, dataset=Path(args.dataset), out=Path(args.out), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every,
        eval_every=args.eval_every, eval_episodes=args.eval_episodes, eval_env=args.eval_env,
        device=args.device, resume=args.resume, ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
        policy_overrides=parse_overrides(args.set or []),
    )
    s = train(cfg)
    print(f"trained {cfg.policy} for {s['steps']} steps in {s['seconds']:.0f} s "
          f"({s['samples_per_s']:.0f} samples/s, final loss {s['final_loss']:.4f}); run folder {s['run_dir']}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="behaviour cloning of a policy on a LeRobotDataset")
    p.add_argument("--policy", required=True, help="policy family: diffusion, flow, vla")
    p.add_argument("--dataset", required=True, help="LeRobotDataset folder")
    p.add_argument("--out", required=True, help="run folder (checkpoints, curves, tensorboard)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="optimizer steps (default: the policy family's: 4000 for diffusion / flow, 3000 for vla)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=_positive_int, default=1000)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate in sim every N steps (0: off)")
    p.add_argument("--eval-episodes", type=_positive_int, default=10)
    p.add_argument("--eval-env", default=None, help="env for --eval-every (default: the dataset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="policy config override, e.g. --set num_inference_steps=8 (repeatable)")
    p.set_defaults(func=cmd_train)


# ---- eval ------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from robopolicy.spec import check_instruction
    from robopolicy.train.evaluate import EvalConfig, evaluate

    if bool(args.checkpoint) == bool(args.model):
        raise RobopolicyError("give exactly one of --checkpoint (a training run) or --model (an export)")
    import torch

    # Batch-1 inference gains nothing from a second thread here, and two OpenMP threads
    # stall badly whenever another process holds a core (p99 went from ~40 ms to seconds).
    torch.set_num_threads(args.threads)
    predictor, source = _load_predictor(args)
    if args.instruction is not None and (predictor.spec.tasks or not args.instruction.strip()):
        check_instruction(args.instruction, predictor.spec.tasks)
    env = args.env or _default_env(predictor)
    cfg = EvalConfig(env=env, episodes=args.episodes, seed=args.seed, randomize=args.randomize,
                     ensemble=args.ensemble, video=Path(args.video) if args.video else None,
                     instruction=args.instruction)
    out_json = Path(args.json) if args.json else Path(source) / f"eval_{env}.json"
    result = evaluate(predictor, cfg, out_json)
    print(result.table())
    print(f"results written to {out_json}")
    return 0


def _load_predictor(args: argparse.Namespace):
    if args.checkpoint:
        from robopolicy.rl import load_trained_policy
        from robopolicy.inference import TorchChunkPredictor

        return TorchChunkPredictor(load_trained_policy(Path(args.checkpoint)), seed=args.seed), args.checkpoint
    from robopolicy.export import load_policy as load_exported

    return load_exported(Path(args.model), backend=args.backend, seed=args.seed), args.model


def _default_env(predictor) -> str:
    env = getattr(predictor, "source_env", None)
    if not env:
        raise RobopolicyError("--env is required: the policy does not record which env its data came from")
    return env


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="closed-loop evaluation of a policy in sim")
    p.add_argument("--checkpoint", help="training run folder (or one checkpoint folder)")
    p.add_argument("--model", help="exported policy folder (policy.onnx + manifest.json)")
    p.add_argument("--backend", default="onnxruntime", help="for --model: onnxruntime, tensorrt, torch")
    p.add_argument("--env", help="task name (default: the env the training data came from)")
    p.add_argument("--episodes", type=_positive_int, default=50)
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode seed (eval seeds differ from collect's)")
    p.add_argument("--randomize", action="store_true", help="apply the env's domain randomization")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling instead of chunk-by-chunk")
    p.add_argument("--instruction", help="force one instruction (language-conditioned envs)")
    p.add_argument("--video", help="write an MP4 of the first rollouts")
    p.add_argument("--json", help="results JSON (default: <checkpoint or model>/eval_<env>.json)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads for inference")
    p.set_defaults(func=cmd_eval)


# ---- export ----------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from robopolicy.export import export_policy

    report = export_policy(Path(args.checkpoint), Path(args.out), fp16=args.fp16, tensorrt=args.tensorrt,
                           threads=args.threads)
    print(report.summary())
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained policy to ONNX (+ TensorRT) with a manifest")
    p.add_argument("--checkpoint", required=True,
                   help="training or fine-tuning run folder (or one checkpoint folder)")
    p.add_argument("--out", required=True,
                   help="export folder (policy.onnx [+ residual.onnx], manifest.json); replaced atomically")
    p.add_argument("--fp16", action="store_true", help="half-precision graph (for GPUs; slower on CPU)")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (needs a CUDA GPU)")
    p.add_argument("--threads", type=_positive_int, default=1, help="ONNX Runtime intra-op threads for the latency report")
    p.set_defaults(func=cmd_export)


# ---- deploy ----------------------------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    from robopolicy.paths import DEPLOY_PARAMS, deploy_params
    from robopolicy.real.deploy import deploy

    params = args.params or deploy_params(args.sim or "")
    if params is None:
        raise RobopolicyError(f"--params is required (defaults exist only for --sim {', '.join(DEPLOY_PARAMS)})")
    deploy(Path(args.model), Path(params), sim=args.sim, episodes=args.episodes, duration_s=args.duration,
           out=Path(args.out) if args.out else None, domain_id=args.domain_id)
    return 0


def add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="run the ROS 2 policy node (and optionally the MuJoCo sim bridge)")
    p.add_argument("--model", required=True, help="export folder (or training run) the node runs")
    p.add_argument("--params", help="node parameter YAML (default for --sim lift: real/config/panda.yaml, "
                                    "--sim push: real/config/push.yaml)")
    p.add_argument("--sim", help="also start the sim bridge for this env and run the closed loop over DDS")
    p.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run with --sim")
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default: until --episodes or Ctrl-C)")
    p.add_argument("--out", help="report folder (default: <model>/deploy/<timestamp>)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: $ROS_DOMAIN_ID; unset: 0 on a robot, random with --sim)")
    p.set_defaults(func=cmd_deploy)


# ---- envs ------------------------------------------------------------------------------
def cmd_envs(args: argparse.Namespace) -> int:
    from robopolicy.sim.registry import env_entry, env_names, plugin_errors

    names = env_names()
    width = max([len("robosuite:<Env>") + 1, *(len(n) + 1 for n in names)])
    for name in names:
        e = env_entry(name)
        cams = ", ".join(e.cameras) or "-"
        expert = "expert" if e.make_expert is not None else "no expert"
        source = "" if e.source == "builtin" else f"  [{e.source}]"
        print(f"{name:<{width}} {expert:<9}  {e.description}  [cameras: {cams}]{source}")
    print(f"{'robosuite:<Env>':<{width}} {'no expert':<9}  any single-arm robosuite environment, e.g. robosuite:Door")
    print(f"{'module:Class':<{width}} {'no expert':<9}  a RobopolicyEnv subclass (or a function building one) "
          f"importable from here")
    for line in plugin_errors():
        print(f"robopolicy envs: warning: {line}", file=sys.stderr)
    return 0


def add_envs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("envs", help="list the simulated tasks (built in and from robopolicy.envs plugins)")
    p.set_defaults(func=cmd_envs)


# ---- demo ------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from robopolicy.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(quick=args.quick, fresh=args.fresh, stage=args.stage, out=Path(args.out)))


def add_demo(sub: argparse._SubParsersAction) -> None:
    from robopolicy.demo.stages import STAGES

    p = sub.add_parser("demo", help="the whole pipeline on the default task, with a report")
    p.add_argument("--quick", action="store_true", help="a small run (CI, a few minutes) that still goes through every stage")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--stage", choices=[s.name for s in STAGES],
                   help="re-run this one stage (reusing the finished ones it needs); later stages are then out of "
                        "date until the next plain `robopolicy demo`")
    p.add_argument("--out", default="outputs/demo", help="folder for the demo's data, runs and report")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from robopolicy import __version__
    from robopolicy.rl.cli import add_finetune

    parser = argparse.ArgumentParser(prog="robopolicy", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"robopolicy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_envs, add_collect, add_teleop, add_dataset, add_record, add_train, add_eval, add_finetune, add_export, add_deploy, add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # First, before any command imports torch, mujoco, lerobot or rclpy (see process_defaults).
    apply_defaults()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RobopolicyError as e:
        if os.environ.get("ROBOPOLICY_DEBUG"):
            raise
        print(f"robopolicy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robopolicy {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `robopolicy dataset info X | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
