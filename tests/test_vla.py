"""The VLA policy family: frozen language encoder, training, language conditioning, checkpoints,
ONNX export with the instruction embedding as input, residual RL on top, and live instruction
switching in the ROS policy node. A tiny model on a tiny multitask dataset made here; the
MiniLM encoder is loaded once per test session (``language.sentence_encoder`` is cached)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robopolicy.cli import main
from robopolicy.data.collect import CollectConfig, collect
from robopolicy.data.reader import dataset_spec, open_dataset
from robopolicy.errors import InstructionError, SpecMismatchError
from robopolicy.export import ObservationError, export_policy
from robopolicy.export import load_policy as load_exported
from robopolicy.policies.factory import make_policy, policy_families
from robopolicy.policies.vla import language
from robopolicy.policies.vla.config import VLAConfig
from robopolicy.policies.vla.objects import candidate_objects
from robopolicy.sim import make_env
from robopolicy.spec import ENV_STATE, LANGUAGE, STATE, Stats
from robopolicy.train.checkpoint import load_policy, save_policy
from robopolicy.train.trainer import TrainConfig, train

TINY = {"dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "language_tokens": 1, "image_channels": [8, 8],
        "image_token_grid": 2, "down_dims": [16, 32], "time_embed_dim": 8, "state_mlp_dims": [32],
        "num_inference_steps": 2, "horizon": 8, "n_action_steps": 4}
IMAGE = "observation.images.front"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vla") / "mt"
    collect(CollectConfig(env="multitask", episodes=5, cameras=("front",), image_size=32, out=out, seed=1))
    return out


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vla_run") / "run"
    train(TrainConfig(policy="vla", dataset=dataset, out=out, steps=20, batch_size=16, warmup_steps=2,
                      save_every=20, log_every=10, policy_overrides=dict(TINY)))
    return out


def _observation(policy_spec, seed: int = 0) -> dict[str, np.ndarray]:
    """A real multitask observation ``[1, To, ...]`` (the first frame repeated) for the policy's features."""
    env = make_env("multitask", cameras=("front",), image_size=32)
    obs, _ = env.reset(seed=seed)
    env.close()
    return {k: np.repeat(obs[k][None, None], policy_spec.n_obs_steps, axis=1) for k in policy_spec.observation_keys}


def _torch_chunk(policy, obs: dict[str, np.ndarray], task: str, noise: np.ndarray) -> np.ndarray:
    batch = {**{k: torch.from_numpy(v) for k, v in obs.items()}, "task": [task]}
    return policy.predict_chunk(batch, torch.from_numpy(noise)).numpy()


def test_factory_builds_vla_with_the_frozen_encoders_instruction_embeddings(dataset: Path) -> None:
    spec = dataset_spec(open_dataset(dataset))
    assert "vla" in policy_families() and len(spec.tasks) >= 2
    policy = make_policy("vla", spec, TINY)
    assert policy.spec.features[LANGUAGE].shape == (language.EMBED_DIM,) and ENV_STATE in policy.spec.features
    assert LANGUAGE not in policy.spec.observation_keys  # computed from the task string, not read from the env
    table = policy.encoder.instruction_embeddings
    torch.testing.assert_close(table, language.embed(spec.tasks))
    torch.testing.assert_close(table.norm(dim=1), torch.ones(len(spec.tasks)))
    assert sum(p.numel() for p in policy.parameters()) < 1e6  # MiniLM (22 M) is frozen outside the policy
    # the family's own chunk execution, not the dataset spec's placeholder (8): a regression once
    untimed = {k: v for k, v in TINY.items() if k not in ("horizon", "n_action_steps")}
    assert make_policy("vla", spec, untimed).spec.n_action_steps == VLAConfig.n_action_steps == 2
    camera_only = make_policy("vla", spec, {**TINY, "use_environment_state": False})
    assert ENV_STATE not in camera_only.spec.features and STATE in camera_only.spec.features


def test_objects_are_grouped_by_name_and_the_instruction_picks_the_named_block(dataset: Path) -> None:
    names = ["red.x", "red.y", "red.yaw", "blue.x", "blue.y", "blue.yaw", "goal.x", "goal.y", "time"]
    assert candidate_objects(names) == {"red": [0, 1, 2], "blue": [3, 4, 5]}
    assert candidate_objects(["red.x", "red.y", "goal.x", "goal.z"]) == {}  # no two objects share fields
    assert candidate_objects(["x", "y"]) == {} and candidate_objects(None) == {}
    policy = make_policy("vla", dataset_spec(open_dataset(dataset)), TINY)
    pointer = policy.encoder.instructed_object
    assert pointer.names == ["red_block", "green_block", "blue_block"] and pointer.rest.tolist() == [12, 13]
    assert pointer.fields.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # grounded by the frozen sentence encoder: each instruction weights the block it names
    weights = pointer.weights(language.embed(policy.spec.tasks))
    for task, row in zip(policy.spec.tasks, weights):
        assert row.max() > 0.99 and pointer.names[int(row.argmax())].split("_")[0] in task, (task, row)
    state = torch.arange(14.0).expand(1, 2, 14)
    picked = pointer(state, language.embed(["push the blue block to the goal"]))
    torch.testing.assert_close(picked, torch.tensor([8.0, 9, 10, 11, 12, 13]).expand(1, 2, 6), atol=1e-2, rtol=0)
    assert make_policy("vla", policy.spec, {**TINY, "select_object": False}).encoder.instructed_object is None
    one_task = dataclasses.replace(policy.spec, tasks=policy.spec.tasks[:1])  # nothing to tell candidates apart
    assert make_policy("vla", one_task, TINY).encoder.instructed_object is None


def test_blocks_the_instruction_does_not_name_do_not_reach_the_policy(dataset: Path) -> None:
    """Neither the state token nor the state MLP sees them (state only: a camera sees every block)."""
    spec = dataset_spec(open_dataset(dataset))
    spec = dataclasses.replace(spec, features={k: f for k, f in spec.features.items() if k != IMAGE})
    encoder = make_policy("vla", spec, TINY).encoder.eval()
    obs = {k: torch.from_numpy(v) for k, v in _observation(spec).items()}
    blue = "push the blue block to the goal"

    def condition(block: int) -> torch.Tensor:  # the encoder's output with one block moved 5 cm in x
        moved = {**obs, ENV_STATE: obs[ENV_STATE].clone()}
        if block >= 0:
            moved[ENV_STATE][..., 4 * block] += 0.05
        with torch.no_grad():
            return encoder({**moved, "task": [blue]})

    still = condition(-1)
    assert (condition(2) - still).abs().max() > 1e-2  # the blue block moved: the condition follows
    for ignored in (0, 1):  # red, green
        assert (condition(ignored) - still).abs().max() < 1e-2 * (condition(2) - still).abs().max()


def test_a_tiny_vla_trains_and_its_checkpoint_needs_no_text_encoder(run: Path, monkeypatch) -> None:
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 20 and np.isfinite(summary["final_loss"])
    first = load_policy(run)
    expected = language.embed(first.spec.tasks)

    def no_encoder(text: str) -> torch.Tensor:
        raise AssertionError(f"the text encoder was asked for {text!r}")

    monkeypatch.setattr(language, "_embed_one", no_encoder)
    policy = load_policy(run)
    torch.testing.assert_close(policy.encoder.instruction_embeddings, expected)
    obs, noise = _observation(policy.spec), np.random.default_rng(0).standard_normal((1, 8, 2), dtype=np.float32)
    chunk = _torch_chunk(policy, obs, policy.spec.tasks[0], noise)
    assert chunk.shape == (1, 4, 2) and np.isfinite(chunk).all()
    np.testing.assert_array_equal(chunk, _torch_chunk(first, obs, policy.spec.tasks[0], noise))


def test_the_instruction_conditions_the_actions(run: Path) -> None:
    policy = load_policy(run)
    obs, noise = _observation(policy.spec), np.random.default_rng(1).standard_normal((1, 8, 2), dtype=np.float32)
    chunks = [_torch_chunk(policy, obs, task, noise) for task in policy.spec.tasks]
    for i in range(len(chunks)):
        for j in range(i + 1, len(chunks)):
            assert np.abs(chunks[i] - chunks[j]).max() > 1e-4, (policy.spec.tasks[i], policy.spec.tasks[j])


def test_empty_unknown_or_missing_instructions_are_refused(run: Path, capsys) -> None:
    policy = load_policy(run)
    obs = {k: torch.from_numpy(v) for k, v in _observation(policy.spec).items()}
    for task, text in (("", "empty instruction"), ("   ", "empty instruction"), ("dance", "unknown instruction")):
        with pytest.raises(InstructionError, match=text):
            policy.predict_chunk({**obs, "task": [task]})
    with pytest.raises(SpecMismatchError, match="needs obs\\['task'\\]"):
        policy.predict_chunk(obs)
    for task, text in (("", "empty instruction"), ("dance", "unknown instruction 'dance'; expected one of")):
        assert main(["eval", "--checkpoint", str(run), "--env", "multitask", "--episodes", "1",
                     "--instruction", task]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("robopolicy eval: error:") and text in err and "\n" not in err


def test_eval_reports_per_instruction_success_and_following(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(run), "--env", "multitask", "--episodes", "3",
                 "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["episodes"] == 3 and set(result["per_task"]) <= set(load_policy(run).spec.tasks)
    assert "env multitask: success" in out
    task = load_policy(run).spec.tasks[-1]
    assert main(["eval", "--checkpoint", str(run), "--env", "multitask", "--episodes", "1", "--instruction", task,
                 "--json", str(tmp_path / "forced.json")]) == 0
    assert list(json.loads((tmp_path / "forced.json").read_text())["per_task"]) == [task]


def test_export_takes_the_embedding_and_maps_task_strings(run: Path, tmp_path: Path) -> None:
    report = export_policy(run, tmp_path / "export", latency_runs=3)
    manifest = report.manifest
    policy = load_policy(run)
    assert [i["name"] for i in manifest["inputs"]][-2:] == [LANGUAGE, "noise"]
    assert manifest["language"]["encoder"] == language.ENCODER_NAME
    assert sorted(manifest["language"]["instructions"]) == sorted(policy.spec.tasks)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["performance"]["onnxruntime"]["p50_ms"] > 0 and manifest["performance"]["torch_eager"]["p50_ms"] > 0
    obs, rng = _observation(policy.spec, seed=3), np.random.default_rng(2)
    for backend in ("onnxruntime", "torch"):
        exported = load_exported(tmp_path / "export", backend=backend)
        for task in policy.spec.tasks:
            noise = rng.standard_normal((1, 8, 2), dtype=np.float32)
            np.testing.assert_allclose(exported.predict_chunk({**obs, "task": [task]}, noise),
                                       _torch_chunk(policy, obs, task, noise), atol=1e-4)
        with pytest.raises(InstructionError, match="unknown instruction"):
            exported.predict_chunk({**obs, "task": ["dance"]})
        with pytest.raises(InstructionError, match="empty instruction"):
            exported.predict_chunk({**obs, "task": [""]})
    big = {**obs, IMAGE: np.zeros((1, 2, 64, 64, 3), np.uint8), "task": [policy.spec.tasks[0]]}
    with pytest.raises(ObservationError, match=f"{IMAGE!r} has shape \\(1, 2, 64, 64, 3\\); the policy expects"):
        exported.predict_chunk(big)


def test_residual_rl_finetunes_on_a_vla_base(run: Path, tmp_path: Path) -> None:
    from robopolicy.rl import ResidualArgs, finetune, load_residual_policy

    summary = finetune(ResidualArgs(
        checkpoint=run, out=tmp_path / "ft", env="multitask", steps=40, num_envs=2, vector="sync", batch_size=16,
        critic_hidden=(32, 32), actor_hidden=(32, 32), learning_starts=10, actor_starts=20, eval_every=0,
        eval_episodes=1, max_episode_steps=20, log_every=10, progress=False))
    assert summary["env_steps"] >= 40
    residual = load_residual_policy(tmp_path / "ft")
    assert residual.base.type == "vla" and residual.actor.obs.keys == [ENV_STATE, STATE]  # state + base action


# ---- ROS: live instruction switching -------------------------------------------------------
TASKS = ["push the red block to the goal", "push the green block to the goal"]


@pytest.fixture(scope="module")
def two_task_push_vla(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny VLA with the push env's features and two instructions (the node is under test)."""
    env = make_env("push")
    spec = env.feature_spec()
    env.close()
    for feature in spec.features.values():
        feature.stats = Stats.unit(feature.dim)
    spec.tasks = list(TASKS)
    torch.manual_seed(0)
    policy = make_policy("vla", spec, {**TINY, "n_obs_steps": 2})
    folder = tmp_path_factory.mktemp("push_vla")
    save_policy(folder, policy, policy.state_dict(), {"env": "push"})
    return folder


@pytest.mark.ros
def test_ros_node_holds_on_a_bad_instruction_and_switches_live_on_a_good_one(two_task_push_vla: Path) -> None:
    from std_msgs.msg import String
    from test_ros_policy import Rig

    from robopolicy.real.rosutil import stream_qos

    rig = Rig(two_task_push_vla, {"observation.language.topic": "/instruction"})
    try:
        pub = rig.feeder.node.create_publisher(String, "/instruction", stream_qos(1, "reliable"))
        deadline = time.monotonic() + 20.0
        while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        rig.start()
        rig.wait(lambda c: rig.message() == "commanding" and c.diagnostic_values().get("task") == TASKS[0],
                 "commanding the default (first) instruction")
        for n, bad in enumerate(("", "dance"), start=1):
            pub.publish(String(data=bad))
            rig.wait(lambda c: rig.value("rejected.instruction") >= n, f"instruction {bad!r} rejected")
            assert ("empty" if not bad else "unknown") + " instruction" in rig.client.diagnostic_values()["rejected.last"]
        rig.wait(lambda c: rig.message() == "holding: waiting_for_policy", "the hold")
        assert rig.client.diagnostic_values()["task"] == "None" and rig.client.state() == "active"
        n = len(rig.client.commands)
        assert np.all(rig.commands_after(n + 2, 5) == 0.0)  # ramped to zero within the rate limit
        pub.publish(String(data=TASKS[1]))
        rig.wait(lambda c: rig.message() == "commanding" and c.diagnostic_values().get("task") == TASKS[1],
                 "commanding the new instruction without a restart")
        assert rig.value("inference_errors") == 0
    finally:
        rig.close()
