"""Residual off-policy RL: networks, replay, demos, the evaluator hook, finetune end to end, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robopolicy.data.collect import CollectConfig, collect
from robopolicy.errors import RobopolicyError, SpecMismatchError
from robopolicy.rl import ResidualArgs, SACArgs, finetune, load_residual_policy, train_sac
from robopolicy.rl import loop
from robopolicy.rl.envs import ChunkRunner
from robopolicy.rl.networks import CriticEnsemble, min_over_subset
from robopolicy.train.optim import polyak_update
from robopolicy.rl.policy import make_residual_policy
from robopolicy.rl.replay import ReplayBuffer, sample_mixed
from robopolicy.rl.residual import ResidualAgent, build, load_demo_buffer
from robopolicy.sim import make_env
from robopolicy.train.checkpoint import POLICY_WEIGHTS, load_policy, load_tensors, resolve_checkpoint, save_policy
from robopolicy.inference import TorchChunkPredictor
from robopolicy.train.evaluate import ChunkExecutor, EvalConfig, evaluate
from robopolicy.train.trainer import TrainConfig, train

TINY = {"down_dims": [16, 32], "time_embed_dim": 8, "state_mlp_dims": [32], "num_inference_steps": 2,
        "horizon": 8, "n_action_steps": 4}
SMALL_RL = dict(num_envs=2, vector="sync", batch_size=16, critic_hidden=(32, 32), actor_hidden=(32, 32),
                learning_starts=20, actor_starts=30, eval_episodes=1, max_episode_steps=20, log_every=10,
                progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny diffusion policy trained for a few steps on 2 push demonstrations."""
    root = tmp_path_factory.mktemp("rl")
    collect(CollectConfig(env="push", episodes=2, out=root / "push", seed=5))
    train(TrainConfig(policy="diffusion", dataset=root / "push", out=root / "base", steps=2, batch_size=8,
                      warmup_steps=1, save_every=2, policy_overrides=dict(TINY)))
    return root / "base"


def _residual(base_run: Path, scale: float = 0.3):
    base = load_policy(base_run)
    return make_residual_policy(base, scale, (32, 32), (-1.0, -1.0), (1.0, 1.0))


def _args(base_run: Path, out: Path, **kw) -> ResidualArgs:
    return ResidualArgs(checkpoint=base_run, out=out, **{**SMALL_RL, **kw})


# ---- networks and helpers ----------------------------------------------------------------
def test_fresh_residual_actor_returns_the_base_action(base_run: Path) -> None:
    policy = _residual(base_run)
    agent = ResidualAgent(policy, _args(base_run, Path("unused")))
    state = torch.randn(64, policy.actor.obs.dim)
    base = torch.rand(64, 2) * 2.4 - 1.2  # some outside the action box
    np.testing.assert_array_equal(agent.act(state, base, explore=False, warmup=False), base.clamp(-1, 1))
    # The evaluator runs it like any policy: same actions as the base alone with the same noise.
    _assert_executes_like_base(policy, steps=10, shift=0.0, atol=1e-6)


def _assert_executes_like_base(policy, steps: int, shift: float, atol: float) -> None:
    """On push, the residual policy executes ``clip(base action + shift)`` at every step."""
    env = make_env("push")
    plain = ChunkExecutor(TorchChunkPredictor(policy.base, seed=1))
    residual = ChunkExecutor(TorchChunkPredictor(policy, seed=1))
    plain.reset(), residual.reset()
    obs, info = env.reset(seed=0)
    for _ in range(steps):
        a = plain.act(obs, info["task"])
        np.testing.assert_allclose(residual.act(obs, info["task"]), np.clip(a + shift, -1, 1), atol=atol)
        obs, *_, info = env.step(a)


def test_evaluator_applies_the_residual_per_step(base_run: Path) -> None:
    policy = _residual(base_run, scale=0.25)
    torch.nn.init.constant_(policy.actor.net[-1].bias, 10.0)  # residual saturates at +scale
    _assert_executes_like_base(policy, steps=6, shift=0.25, atol=1e-5)


def test_vectorized_chunk_runner_matches_the_evaluators_executor(base_run: Path) -> None:
    base = load_policy(base_run)
    env = make_env("push")
    executor, runner = ChunkExecutor(TorchChunkPredictor(base, seed=3)), ChunkRunner(base, num_envs=3, seed=3)
    executor.reset()
    obs, info = env.reset(seed=1)
    for t in range(11):  # crosses chunk boundaries (Ta = 4); env 1 of 3 is driven, the others idle
        batched = {k: v[None] for k, v in obs.items()}
        got = runner.act(batched, np.array([1]), np.array([t == 0]), [info["task"]])
        want = executor.act(obs, info["task"])
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        obs, *_, info = env.step(want)


def test_polyak_update_moves_targets_by_tau() -> None:
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = dst.weight.detach().clone()
    polyak_update(dst, src, 0.25)
    torch.testing.assert_close(dst.weight, 0.75 * before + 0.25 * src.weight)
    polyak_update(dst, src, 1.0)
    torch.testing.assert_close(dst.weight, src.weight)


def test_min_over_subset() -> None:
    q = torch.tensor([[3.0, 1.0], [2.0, 5.0], [4.0, 0.0], [6.0, 7.0]])  # [E=4, B=2]
    torch.testing.assert_close(min_over_subset(q, 4), torch.tensor([2.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    seen = set()
    for _ in range(60):
        out = min_over_subset(q, 2, g)
        match = [p for p in pairs if torch.equal(out, q[list(p)].min(0).values)]
        assert match, out
        seen.update(match)
    assert len(seen) >= 4  # random subsets, not always the same
    with pytest.raises(ValueError):
        min_over_subset(q, 5)


def test_critic_ensemble_members_are_independent() -> None:
    critic = CriticEnsemble(3, 5, (8,))
    q = critic(torch.randn(7, 3), torch.randn(7, 2))
    assert q.shape == (3, 7) and not torch.allclose(q[0], q[1])


# ---- replay ------------------------------------------------------------------------------
def _fill(buffer: ReplayBuffer, rewards, terminated, truncated, stream_count: int = 2) -> None:
    """Interleave ``stream_count`` streams; transition t of stream s has state value 10*s + t."""
    for t in range(len(rewards)):
        s = np.arange(stream_count)
        state = (10 * s + t)[:, None].astype(np.float32)
        buffer.add(state, np.zeros((stream_count, 1)), np.zeros((stream_count, 1)), np.full(stream_count, rewards[t]),
                   state + 1, np.zeros((stream_count, 1)), np.full(stream_count, terminated[t]),
                   np.full(stream_count, truncated[t]))


def test_n_step_returns_stop_at_terminals_time_limits_and_the_buffer_head() -> None:
    g = 0.5
    b = ReplayBuffer(100, 1, 1, num_streams=2)
    # stream episodes: t0..t2 end in a terminal (reward 1 at t2); t3..t4 truncated; t5, t6 open.
    _fill(b, [0, 0, 1, 0, 2, 0, 4], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0])
    idx = np.arange(0, 14, 2)  # stream 0, t = 0..6
    batch = b.gather(idx, n_step=3, gamma=g)
    np.testing.assert_allclose(batch.reward, [0 + 0 + g * g * 1, 0 + g * 1, 1, 0 + g * 2, 2, 0 + g * 4, 4])
    np.testing.assert_allclose(batch.discount, [0, 0, 0, g**2, g, g**2, g])  # 0 after a terminal
    np.testing.assert_allclose(batch.next_state[:, 0], [3, 3, 3, 5, 5, 7, 7])
    one = b.gather(idx, n_step=1, gamma=g)
    np.testing.assert_allclose(one.reward, [0, 0, 1, 0, 2, 0, 4])
    np.testing.assert_allclose(one.next_state[:, 0], np.arange(7) + 1)
    # Stream 1 is interleaved with stream 0 and never mixes with it.
    np.testing.assert_allclose(b.gather(np.array([1]), 3, g).next_state[:, 0], [13])


def test_replay_wraps_and_survives_save_and_load(tmp_path: Path) -> None:
    b = ReplayBuffer(8, 1, 1, num_streams=2)
    _fill(b, [0, 1, 0, 0, 3, 0, 0], [0, 1, 0, 0, 0, 0, 0], [0] * 7)  # 14 transitions in a ring of 8
    assert len(b) == 8
    b.save(tmp_path / "r.safetensors")
    def table(buf: ReplayBuffer) -> dict[float, tuple[float, float, float]]:
        x = buf.gather(np.arange(len(buf)), 3, 0.9)
        return {float(s): (float(r), float(n), float(d))
                for s, r, n, d in zip(x.state[:, 0], x.reward, x.next_state[:, 0], x.discount)}

    for capacity in (8, 20, 4):  # same, larger (a longer resumed run), smaller (keeps the newest)
        c = ReplayBuffer(capacity, 1, 1, num_streams=2)
        c.load(tmp_path / "r.safetensors")
        assert len(c) == min(8, capacity)
        old, new = table(b), table(c)
        assert all(new[k] == old[k] for k in new)  # same transitions, same n-step targets
    assert sorted(table(b)) == [3, 4, 5, 6, 13, 14, 15, 16]  # the ring kept the newest 8


def test_batches_mix_demos_at_the_requested_ratio() -> None:
    online, demos = ReplayBuffer(50, 1, 1), ReplayBuffer(50, 1, 1)
    for buf, value in ((online, 0.0), (demos, 1.0)):
        for _ in range(20):
            buf.add(np.full((1, 1), value), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)),
                    np.zeros((1, 1)), np.zeros(1, bool), np.ones(1, bool))
    rng = np.random.default_rng(0)
    for fraction, expected in ((0.5, 32), (0.25, 16), (0.0, 0)):
        batch = sample_mixed(online, demos, 64, fraction, 3, 0.99, rng)
        assert batch.state.shape == (64, 1) and int(batch.state.sum()) == expected


def test_demos_enter_replay_with_base_actions_and_success_terminals(base_run: Path) -> None:
    policy = _residual(base_run)
    dataset = Path(policy.base.checkpoint_meta["dataset"]["path"])
    demos = load_demo_buffer(dataset, policy, seed=0)
    frames = policy.base.checkpoint_meta["dataset"]["frames"]
    assert len(demos) == frames  # expert episodes end in success: every frame is a transition
    assert demos.terminated.sum() == 2 and np.all(demos.reward[demos.terminated] == 1.0)
    base, action = demos.base[:len(demos)], demos.action[:len(demos)]
    assert np.all(np.abs(base) <= 1.0 + 1e-6) and not np.allclose(base, action)  # the base's own actions
    batch = demos.gather(np.array([0]), n_step=1, gamma=0.99)
    assert batch.discount.item() == pytest.approx(0.99)


# ---- finetune end to end ---------------------------------------------------------------------
def test_a_base_that_does_not_fit_the_env_fails_before_training(base_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecMismatchError, match=r"base policy .*env 'multitask'.*observation.environment_state"):
        finetune(_args(base_run, tmp_path / "ft", env="multitask", steps=50))
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_finetune_end_to_end_then_resume_restores_everything(base_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    summary = finetune(_args(base_run, out, steps=60, eval_every=30, save_every=30))
    assert summary["env_steps"] == 60 and summary["updates"] == 38  # due for the steps stored before the last
    log = json.loads((out / "log.json").read_text())
    assert [row[0] for row in log["history"]["eval"]] == [0, 30, 60]
    assert log["summary"]["throughput"]["env_steps_per_s"] > 0 and log["history"]["train"]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = resolve_checkpoint(out)
    assert ckpt.name == "step_000000060" and (ckpt / "replay.safetensors").is_file()

    # The saved policy is first-class: it loads and the evaluator runs it.
    policy = load_residual_policy(out)
    result = evaluate(TorchChunkPredictor(policy), EvalConfig(env="push", episodes=1, progress=False,
                                                               max_episode_steps=10))
    assert result.episodes == 1

    with pytest.raises(RobopolicyError, match="already holds a run"):
        finetune(_args(base_run, out, steps=80))

    # Resume: networks, optimizers, counters, RNG and replay come back as saved.
    setup = build(_args(None, out, steps=80, resume=True, eval_every=0))
    try:
        state, _ = loop._restore(out, setup)
        assert state.env_steps == 60 and state.updates == 38 and len(setup.online) == 60
        saved = load_tensors(ckpt / POLICY_WEIGHTS)
        for k, v in setup.agent.actor.state_dict().items():
            torch.testing.assert_close(v, saved[f"actor.{k}"])
        opt = setup.agent.critic_optim.state_dict()["state"]
        train_state = load_tensors(ckpt / "train_state.safetensors")
        torch.testing.assert_close(opt[0]["exp_avg"], train_state["optimizer.critic.optim.0.exp_avg"])
    finally:
        setup.envs.close()
    summary = finetune(_args(None, out, steps=80, resume=True, eval_every=0))
    assert summary["env_steps"] == 80 and summary["updates"] == 58
    log = json.loads((out / "log.json").read_text())
    assert [row[0] for row in log["history"]["eval"]] == [0, 30, 60, 80]


def test_finetune_flags_map_onto_residual_args() -> None:
    import argparse

    from robopolicy.rl.cli import add_finetune, residual_args

    parser = argparse.ArgumentParser()
    add_finetune(parser.add_subparsers())
    ns = parser.parse_args(["finetune", "--checkpoint", "runs/bc", "--env", "lift", "--steps", "200000", "--out", "ft",
                            "--num-envs", "8", "--randomize", "--critic-hidden", "512,512", "--vector", "sync"])
    args = residual_args(ns)
    assert args == ResidualArgs(checkpoint=Path("runs/bc"), env="lift", steps=200_000, out=Path("ft"), num_envs=8,
                                randomize=True, critic_hidden=(512, 512), vector="sync")


def test_sac_baseline_runs(base_run: Path, tmp_path: Path) -> None:
    summary = train_sac(SACArgs(stats_from=base_run, env="push", out=tmp_path / "sac", steps=40,
                                **{**SMALL_RL, "actor_starts": 0}))
    assert summary["env_steps"] == 40 and summary["updates"] == 18
    assert (tmp_path / "sac" / "learning_curve.png").is_file()


def test_residual_actor_exports_to_onnx_alone(base_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    actor = _residual(base_run).actor.eval()
    torch.nn.init.normal_(actor.net[-1].weight, std=0.5)
    state, base = torch.randn(3, actor.obs.dim), torch.rand(3, 2) * 2 - 1
    path = tmp_path / "residual.onnx"
    torch.onnx.export(actor, (state, base), str(path), input_names=["state", "base_action"],
                      output_names=["action"], dynamic_axes={"state": {0: "B"}, "base_action": {0: "B"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"state": state.numpy(), "base_action": base.numpy()})
    np.testing.assert_allclose(got, actor(state, base).detach().numpy(), atol=1e-5)


def test_evaluator_runs_the_exported_residual_like_torch(base_run: Path, tmp_path: Path, capsys) -> None:
    """``robopolicy export`` of a fine-tuning, then the evaluator: ONNX Runtime (chunk + correction graphs)
    and the export's torch backend take the same actions on a seeded episode, and the correction acts."""
    from types import SimpleNamespace

    from robopolicy.cli import main
    from robopolicy.export import export_policy
    from robopolicy.export import load_policy as load_export

    policy = _residual(base_run)
    torch.nn.init.normal_(policy.actor.net[-1].weight, std=0.5)
    save_policy(tmp_path / "ft", policy, policy.state_dict(), {"env": "push"})
    folder = export_policy(tmp_path / "ft", tmp_path / "export", latency_runs=2).out
    exported = load_export(folder, seed=7)
    plan = load_export(folder, seed=7)
    executors = [ChunkExecutor(p) for p in (exported, load_export(folder, backend="torch", seed=7),
                                            SimpleNamespace(spec=plan.spec, predict_chunk=plan.predict_chunk))]
    env = make_env("push")
    obs, info = env.reset(seed=0)
    for e in executors:
        e.reset()
    corrected = 0
    for _ in range(12):  # three chunks (Ta = 4)
        onnx_action, torch_action, planned = (e.act(obs, info["task"]) for e in executors)
        np.testing.assert_allclose(onnx_action, torch_action, atol=1e-4)
        corrected += int(np.abs(onnx_action - np.clip(planned, -1, 1)).max() > 1e-3)
        obs, *_, info = env.step(onnx_action)
    env.close()
    assert corrected >= 6
    threads = torch.get_num_threads()
    try:  # eval sets torch's thread count (--threads): later tests must not inherit it
        assert main(["eval", "--model", str(folder), "--episodes", "1", "--json", str(tmp_path / "eval.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "env push: success" in capsys.readouterr().out
