"""Policies: normalization, training signal, padding, sampling parity with diffusers, ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from robopolicy.errors import RobopolicyError, SpecMismatchError, UnknownNameError
from robopolicy.policies.denoising import DenoisingPolicy
from robopolicy.policies.diffusion.model import DiffusionPolicy, ddim_scheduler
from robopolicy.policies.factory import config_from_dict, config_to_dict, make_policy, policy_families
from robopolicy.policies.flow.config import FlowConfig
from robopolicy.policies.normalize import Normalizer
from robopolicy.spec import Feature, FeatureSpec, Stats

FAMILIES = ["diffusion", "flow"]
TINY = {
    "n_obs_steps": 2,
    "horizon": 8,
    "n_action_steps": 4,
    "down_dims": [16, 32],
    "n_groups": 4,
    "kernel_size": 3,
    "time_embed_dim": 16,
    "state_mlp_dims": [32],
    "image_channels": [8, 16],
    "image_keypoints": 4,
    "image_feature_dim": 8,
}
CAMERA = "observation.images.front"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP's spinning barrier makes
    2 threads crawl when another process holds one of this machine's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def low_dim(name: str, lo: list[float], hi: list[float]) -> Feature:
    mean = [(a + b) / 2 for a, b in zip(lo, hi)]
    return Feature(name, (len(lo),), stats=Stats(min=lo, max=hi, mean=mean, std=[1.0] * len(lo)))


def make_spec(image: bool = False) -> FeatureSpec:
    feats = {
        "observation.state": low_dim("observation.state", [-1.0, 0.0, 2.0], [1.0, 5.0, 4.0]),
        "observation.environment_state": low_dim("observation.environment_state", [0.0] * 4, [1.0] * 4),
        "action": low_dim("action", [-2.0, 0.0], [2.0, 1.0]),
    }
    if image:
        feats[CAMERA] = Feature(CAMERA, (20, 20, 3), dtype="uint8")
    return FeatureSpec(features=feats, fps=10.0)


def make_batch(spec: FeatureSpec, b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    to, tp = 2, 8
    batch: dict[str, torch.Tensor] = {}
    for f in spec.state_features:
        lo, hi = torch.tensor(f.stats.min), torch.tensor(f.stats.max)
        batch[f.name] = lo + (hi - lo) * torch.rand(b, to, f.dim, generator=g)
    for f in spec.image_features:
        batch[f.name] = torch.randint(0, 256, (b, to, *f.shape), generator=g, dtype=torch.uint8)
    # Smooth, observation-dependent action chunks inside the action range.
    phase = batch["observation.state"][:, -1, :1]
    steps = torch.linspace(0, 1, tp).view(1, tp)
    batch["action"] = torch.stack([1.5 * torch.sin(3 * steps + phase), 0.5 + 0.4 * torch.cos(2 * steps - phase)], -1)
    batch["action_is_pad"] = torch.zeros(b, tp, dtype=torch.bool)
    return batch


def seeded_loss(policy: DenoisingPolicy, batch: dict[str, torch.Tensor], seed: int = 123) -> torch.Tensor:
    torch.manual_seed(seed)
    return policy.compute_loss(batch)[0]


# -- normalization ---------------------------------------------------------------------------
def test_normalizer_round_trip_and_tiny_ranges() -> None:
    feature = low_dim("action", [-2.0, 0.0, 3.0], [2.0, 10.0, 3.00001])
    feature.stats.mean[2] = 3.000004
    norm = Normalizer([feature])
    x = torch.tensor([[-2.0, 0.0, 3.0], [2.0, 10.0, 3.00001], [0.5, 2.5, 3.000002]])
    y = norm.normalize("action", x)
    assert torch.allclose(y[:, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.25, -0.5]]))
    assert torch.all(y[:, 2] == 0)  # tiny range -> 0
    back = norm.unnormalize("action", y)
    assert torch.allclose(back[:, :2], x[:, :2], atol=1e-6)
    assert torch.allclose(back[:, 2], torch.full((3,), 3.000004))  # ... and back to the mean
    assert {"affines.action.scale", "affines.action.center"} <= set(norm.state_dict())
    with pytest.raises(SpecMismatchError, match="observation.state"):
        norm.normalize("observation.state", x)


def test_normalization_is_saved_with_the_policy() -> None:
    spec = make_spec()
    trained = make_policy("diffusion", spec, TINY)
    keys = set(trained.state_dict())
    assert "action_normalizer.affines.action.scale" in keys
    assert "encoder.normalizer.affines.observation_state.shift" in keys
    other = make_spec()
    other.features["action"] = low_dim("action", [-9.0, -9.0], [9.0, 9.0])
    fresh = make_policy("diffusion", other, TINY)
    fresh.load_state_dict(trained.state_dict())
    x = torch.tensor([[1.0, 0.5]])
    assert torch.equal(fresh.action_normalizer.normalize("action", x), trained.action_normalizer.normalize("action", x))


def test_missing_statistics_are_named() -> None:
    spec = make_spec()
    spec.features["observation.state"].stats = None
    with pytest.raises(SpecMismatchError, match="observation.state"):
        make_policy("flow", spec, TINY)


# -- training signal -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_decreases_when_overfitting(family: str) -> None:
    torch.manual_seed(0)
    spec = make_spec()
    policy = make_policy(family, spec, TINY)
    batch = make_batch(spec, b=16)
    before = seeded_loss(policy, batch).item()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(50):
        loss, info = policy.compute_loss(batch)
        assert torch.isfinite(loss) and info["loss"] == pytest.approx(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = seeded_loss(policy, batch).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_steps_are_out_of_the_loss(family: str) -> None:
    torch.manual_seed(0)
    spec = make_spec()
    policy = make_policy(family, spec, TINY)
    batch = make_batch(spec)
    batch["action_is_pad"][0, -3:] = True  # episode ended
    batch["action_is_pad"][1, :2] = True  # episode not begun
    base = seeded_loss(policy, batch)
    changed = dict(batch, action=batch["action"].clone())
    changed["action"][batch["action_is_pad"]] = 100.0
    assert torch.equal(seeded_loss(policy, changed), base)
    changed["action"][0, 0] += 1.0  # a valid step does count
    assert not torch.equal(seeded_loss(policy, changed), base)


# -- sampling --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_chunk_shape_range_and_determinism(family: str) -> None:
    torch.manual_seed(0)
    spec = make_spec()
    policy = make_policy(family, spec, TINY).eval()
    obs = {k: v for k, v in make_batch(spec, b=3).items() if k.startswith("observation.")}
    noise = torch.randn(policy.noise_shape(3))
    chunk = policy.predict_chunk(obs, noise)
    assert chunk.shape == (3, 4, 2)
    assert torch.equal(chunk, policy.predict_chunk(obs, noise))
    assert not torch.equal(chunk, policy.predict_chunk(obs, torch.randn_like(noise)))
    assert torch.all(chunk >= torch.tensor([-2.0, 0.0]) - 1e-5) and torch.all(chunk <= torch.tensor([2.0, 1.0]) + 1e-5)
    assert policy.predict_chunk(obs).shape == (3, 4, 2)
    with pytest.raises(SpecMismatchError, match="observation.state"):
        policy.predict_chunk({**obs, "observation.state": obs["observation.state"][:, :1]}, noise)
    with pytest.raises(SpecMismatchError, match="noise"):
        policy.predict_chunk(obs, noise[:, :4])


def test_images_with_state() -> None:
    torch.manual_seed(0)
    spec = make_spec(image=True)
    policy = make_policy("diffusion", spec, TINY)
    batch = make_batch(spec, b=4)
    assert batch[CAMERA].dtype == torch.uint8
    loss, _ = policy.compute_loss(batch)  # train mode: random crops
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.encoder.cameras.parameters())
    camera = policy.encoder.cameras[0]
    frames = batch[CAMERA][:, 0]
    assert camera.crop(frames).shape == (4, 18, 18, 3)
    assert not torch.equal(camera.crop(frames), camera.crop(frames))  # random offsets
    policy.eval()
    assert torch.equal(camera.crop(frames), frames[:, 1:19, 1:19])  # center crop
    obs = {k: v for k, v in batch.items() if k.startswith("observation.")}
    noise = torch.randn(policy.noise_shape(4))
    assert torch.equal(policy.predict_chunk(obs, noise), policy.predict_chunk(obs, noise))


def test_ddim_step_matches_diffusers() -> None:
    torch.manual_seed(0)
    policy = make_policy("diffusion", make_spec(), {**TINY, "num_inference_steps": 7})
    assert isinstance(policy, DiffusionPolicy)
    scheduler = ddim_scheduler(policy.config)
    assert torch.equal(policy.ddim_time, scheduler.timesteps.float())
    for k, t in enumerate(scheduler.timesteps):
        x = 2.0 * torch.randn(3, 2, 8)
        eps = 2.0 * torch.randn(3, 2, 8)  # large enough that x0 gets clipped
        expected = scheduler.step(eps, t, x).prev_sample
        torch.testing.assert_close(policy.ddim_step(x, eps, k), expected, atol=1e-5, rtol=1e-5)


def test_ddim_sampler_matches_a_diffusers_loop() -> None:
    torch.manual_seed(0)
    policy = make_policy("diffusion", make_spec(), TINY).eval()
    assert isinstance(policy, DiffusionPolicy)
    obs = {k: v for k, v in make_batch(spec=make_spec(), b=2).items() if k.startswith("observation.")}
    x = torch.randn(2, 2, 8)
    with torch.no_grad():
        obs_film = policy.unet.condition(policy.encoder(obs))
        ours = policy.sample(x, obs_film)
        scheduler = ddim_scheduler(policy.config)
        ref = x
        for t in scheduler.timesteps:
            film = obs_film + policy.unet.time_film(t.float().view(1))
            ref = scheduler.step(policy.unet(ref, film), t, ref).prev_sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# -- ONNX export -----------------------------------------------------------------------------
class ChunkGraph(nn.Module):
    """predict_chunk with positional inputs: observations in spec order, then the noise."""

    def __init__(self, policy: DenoisingPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.keys = policy.spec.observation_keys

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.policy.predict_chunk(dict(zip(self.keys, inputs[:-1])), inputs[-1])


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # raised inside torch.export
@pytest.mark.parametrize(("family", "image"), [("diffusion", False), ("flow", True)])
def test_onnx_export_matches_torch(family: str, image: bool, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    spec = make_spec(image=image)
    policy = make_policy(family, spec, {**TINY, "num_inference_steps": 2}).eval()  # export time grows per step
    graph = ChunkGraph(policy).eval()
    batch = make_batch(spec, b=1)
    inputs = [batch[k] for k in graph.keys] + [torch.randn(policy.noise_shape(1))]
    names = [k.replace(".", "_") for k in graph.keys] + ["noise"]
    path = tmp_path / f"{family}.onnx"
    torch.onnx.export(graph, tuple(inputs), str(path), input_names=names, output_names=["action"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    expected = graph(*inputs).numpy()
    assert got.shape == expected.shape == (1, 4, 2)
    assert np.abs(got - expected).max() <= 1e-4


# -- factory ---------------------------------------------------------------------------------
def test_factory_names_and_round_trip() -> None:
    assert policy_families() == ["diffusion", "flow", "vla"]
    # Timing comes from the family's config (a dataset's spec has only placeholders), then overrides.
    untimed = {k: v for k, v in TINY.items() if k not in ("horizon", "n_action_steps")}
    for spec in (make_spec(), make_spec().with_timing(2, 8, 3)):
        assert make_policy("flow", spec, untimed).spec.n_action_steps == FlowConfig.n_action_steps == 8
    policy = make_policy("flow", make_spec(), {**untimed, "horizon": 8, "n_action_steps": 3})
    assert (policy.spec.horizon, policy.spec.n_action_steps) == (8, 3)
    d = json.loads(json.dumps(config_to_dict(policy.config)))
    assert d["type"] == "flow" and d["down_dims"] == [16, 32]
    assert config_from_dict("flow", d) == policy.config


@pytest.mark.parametrize(
    ("name", "values", "match"),
    [
        ("diffusion", {"down_dim": [8]}, "unknown field.*'down_dim'"),
        ("diffusion", {"horizon": 16.0}, "'horizon' expects int"),
        ("diffusion", {"clip_sample": 1}, "'clip_sample' expects bool"),
        ("diffusion", {"down_dims": "64"}, "'down_dims' expects tuple"),
        ("diffusion", {"down_dims": [64, "x"]}, "'down_dims' expects tuple"),
        ("diffusion", {"beta_schedule": "cosine"}, "'beta_schedule' expects one of"),
        ("flow", {"type": "diffusion"}, "config says type 'diffusion'"),
        ("diffusion", {"horizon": 10, "down_dims": [16, 32, 64]}, "divisible by 4"),
        ("diffusion", {"num_inference_steps": 200}, "num_inference_steps"),
    ],
)
def test_factory_rejects_bad_configs(name: str, values: dict, match: str) -> None:
    with pytest.raises(RobopolicyError, match=match):
        config_from_dict(name, values)


def test_unknown_policy_name() -> None:
    with pytest.raises(UnknownNameError, match="unknown policy 'act'.*diffusion, flow"):
        make_policy("act", make_spec())
