"""Running an exported policy: manifest checks at load, observation checks at every call.

:func:`load_policy` opens an export folder (``policy.onnx`` + ``manifest.json`` +
``checkpoint/``, + ``residual.onnx`` for a residual-RL fine-tuning) with one of three
backends and returns an :class:`ExportedPolicy` (an :class:`ExportedResidualPolicy`, with
the per-step ``correct_action``, when the export has a residual), which satisfies
``robopolicy.inference.ChunkPredictor``:

* ``"onnxruntime"``: CPU session (graph optimizations ALL, sequential, ``threads`` intra-op);
* ``"tensorrt"``: ONNX Runtime's TensorRT provider with the engine cached at export time;
* ``"torch"``: the checkpoint shipped in ``checkpoint/`` (same weights, eager torch), for
  debugging a parity problem or running where no ONNX Runtime exists.

At load the whole folder is verified: the size and SHA-256 of each ``.onnx`` file (a
truncated or edited file fails here, with a clear message, not inside ONNX Runtime), each
graph's inputs / outputs against the manifest and the feature spec, and every manifest field
the graph was exported with: each graph carries them in its metadata
(:data:`BOUND_FIELDS_KEY`, covered by its SHA-256), so an edited ``fps`` or ``n_action_steps``
is refused, naming the field and both values. The torch backend also checks the checkpoint
copy's size and SHA-256. Every call checks each observation (missing, wrong shape, wrong
dtype, NaN / inf) and names the feature, expected and actual: nothing is reshaped or cast
silently; a non-finite action coming out of the graph is a :class:`NonFiniteActionError`,
never returned.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.errors import RobopolicyError, UnknownNameError
from robopolicy.export.errors import ModelFileError, NonFiniteActionError, ObservationError
from robopolicy.inference import BACKENDS
from robopolicy.spec import ACTION, LANGUAGE, Feature, FeatureSpec, check_instruction

MODEL_FILE = "policy.onnx"
#: The per-step correction graph of a residual-RL policy (manifest section ``"residual"``).
RESIDUAL_FILE = "residual.onnx"
RESIDUAL = "residual"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_DIR = "checkpoint"
TENSORRT_DIR = "tensorrt"
#: Format 2: each graph carries the manifest fields it was exported with (:data:`BOUND_FIELDS_KEY`).
MANIFEST_FORMAT = "robopolicy.export/2"
#: The ONNX metadata key under which each graph carries, as JSON, the manifest fields it was exported
#: with (see :func:`bound_fields`); the graph's SHA-256 covers them, and the load compares them.
BOUND_FIELDS_KEY = "robopolicy.manifest"
#: Manifest sections that get more fields once their graph is written (its size and SHA-256, what was
#: measured on it): a graph carries their fields one by one (``"model.opset"``), other sections whole.
OPEN_SECTIONS = ("model", RESIDUAL)
NOISE = "noise"
BASE_ACTION = "base_action"


@dataclass(frozen=True)
class TensorSig:
    """Name, static shape and dtype of one graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSig":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


def graph_inputs(spec: FeatureSpec) -> list[TensorSig]:
    """The graph inputs of a policy: each observation feature ``[1, To, ...]`` in spec order, the
    instruction embedding ``[1, E]`` of a language-conditioned policy, then the noise."""
    sigs = [
        TensorSig(f.name, (1, spec.n_obs_steps, *f.shape), "uint8" if f.kind == "image" else "float32")
        for f in spec.state_features + spec.image_features
    ]
    if spec.language is not None:
        sigs.append(TensorSig(LANGUAGE, (1, *spec.language.shape), "float32"))
    return [*sigs, TensorSig(NOISE, (1, spec.horizon, spec.action.dim), "float32")]


def graph_outputs(spec: FeatureSpec) -> list[TensorSig]:
    """The graph output: the unnormalized action chunk ``[1, Ta, Da]``."""
    return [TensorSig(ACTION, (1, spec.n_action_steps, spec.action.dim), "float32")]


def correction_inputs(spec: FeatureSpec) -> list[TensorSig]:
    """The inputs of a residual policy's correction graph: each low-dim feature's current value
    ``[1, *shape]`` in spec order (the actor's ``keys``), then the planned action ``[1, Da]``."""
    sigs = [TensorSig(f.name, (1, *f.shape), "float32") for f in spec.state_features]
    return [*sigs, TensorSig(BASE_ACTION, (1, spec.action.dim), "float32")]


def correction_outputs(spec: FeatureSpec) -> list[TensorSig]:
    """The correction graph's output: the executed raw action ``[1, Da]``."""
    return [TensorSig(ACTION, (1, spec.action.dim), "float32")]


def _uniform(feature, shape: tuple[int, ...], rng: np.random.Generator, margin: float = 0.0) -> np.ndarray:
    """Uniform in the feature's dataset range (``[-1, 1]`` without statistics), widened by ``margin``
    of the range on each side; the last ``feature.shape`` axes of ``shape`` are the feature's."""
    lo = np.asarray(feature.stats.min if feature.stats else [-1.0] * feature.dim, np.float32).reshape(feature.shape)
    hi = np.asarray(feature.stats.max if feature.stats else [1.0] * feature.dim, np.float32).reshape(feature.shape)
    lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
    return (lo + rng.random(shape, dtype=np.float32) * (hi - lo)).astype(np.float32)


def sample_observation(spec: FeatureSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A valid random observation batch: low-dim features uniform in their dataset range, random images."""
    obs: dict[str, np.ndarray] = {}
    for sig in graph_inputs(spec)[:-1]:
        if sig.dtype == "uint8":
            obs[sig.name] = rng.integers(0, 256, sig.shape, dtype=np.uint8)
        else:
            obs[sig.name] = _uniform(spec.features[sig.name], sig.shape, rng)
    return obs


def sample_correction_feeds(spec: FeatureSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid random correction-graph feeds: low-dim features in their dataset range and a planned
    action in (and up to 10 % beyond, to exercise the clipping) the dataset's action range."""
    sigs = correction_inputs(spec)
    feeds = {sig.name: _uniform(spec.features[sig.name], sig.shape, rng) for sig in sigs[:-1]}
    feeds[BASE_ACTION] = _uniform(spec.action, sigs[-1].shape, rng, margin=0.1)
    return feeds


def first_non_finite(array: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN / inf of ``array`` (C order), or ``None`` when all of it is finite."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))


def dimension_name(feature: Feature | None, index: int) -> str | int:
    """The name of dimension ``index`` of a 1-D ``feature`` that names its dimensions, else ``index``."""
    if feature is not None and feature.names and len(feature.shape) == 1:
        return feature.names[index]
    return index


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def session_options(threads: int = 1, optimized_model: Path | None = None):
    """ONNX Runtime options used for every CPU run: all graph optimizations, sequential, ``threads`` intra-op.

    One thread is the default (the robot's other processes keep the other cores). Extra
    intra-op threads do not spin while waiting: on a 2-core machine shared with other
    processes, spinning workers made chunks ~1.4x slower than one thread, sleeping ones
    ~1.1x faster.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    return options


class ExportedPolicy:
    """An exported policy behind one backend: ``predict_chunk(obs) -> [1, Ta, Da]`` raw actions."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], backend: str,
        run: Callable[[dict[str, np.ndarray]], np.ndarray], seed: int,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.spec = FeatureSpec.from_dict(manifest["spec"])
        self.source_env: str | None = manifest["source"].get("env")
        self.inputs = [TensorSig.from_dict(d) for d in manifest["inputs"]]
        self._run = run
        self._rng = np.random.default_rng(seed)
        #: Instruction -> embedding ``[E]`` (manifest section ``"language"``) of a language-conditioned policy.
        self.instructions = {t: np.asarray(e, np.float32) for t, e in manifest.get("language", {}).get("instructions", {}).items()}
        if self.spec.language is not None and not self.instructions:
            raise ModelFileError(f"{folder / MANIFEST_FILE}: the policy takes {LANGUAGE!r} but the manifest has no "
                                 "language.instructions (instruction embeddings); export again")

    def _with_language(self, obs: Mapping[str, Any]) -> Mapping[str, Any]:
        """``obs`` plus the cached embedding ``[1, E]`` of ``obs["task"]`` when the policy takes one and
        ``obs`` lacks it; an empty or unknown instruction is an :class:`~robopolicy.errors.InstructionError`."""
        if self.spec.language is None or LANGUAGE in obs:
            return obs
        task = obs.get("task")
        if isinstance(task, (list, tuple)) and len(task) == 1:
            task = task[0]
        return {**obs, LANGUAGE: self.instructions[check_instruction(task, list(self.instructions))][None]}

    def predict_chunk(self, obs: Mapping[str, Any], noise: np.ndarray | None = None) -> np.ndarray:
        """Raw observations ``{name: [1, To, ...]}`` -> ``[1, Ta, Da]``. A language-conditioned policy reads
        ``"task"`` (the instruction, mapped to its cached embedding) unless ``observation.language`` is given.

        ``noise`` ``[1, Tp, Da]`` float32 is the sampler's start; drawn from this
        predictor's seeded generator when not given (the same seed gives the same chunks). A
        non-finite chunk is a :class:`~robopolicy.export.errors.NonFiniteActionError`, never returned.
        """
        obs = self._with_language(obs)
        feeds = self._observation_feeds(self.inputs[:-1], obs, self._legend)
        noise_sig = self.inputs[-1]
        if noise is None:
            noise = self._rng.standard_normal(noise_sig.shape, dtype=np.float32)
        feeds[noise_sig.name] = self._checked(noise_sig, noise, "input", self._legend(noise_sig))
        return self._finite_action(self._run(feeds), MODEL_FILE)

    def _observation_feeds(
        self, sigs: list[TensorSig], obs: Mapping[str, Any], legend: Callable[[TensorSig], str],
    ) -> dict[str, np.ndarray]:
        """``obs[sig.name]`` for each of ``sigs``, each checked (missing, shape, dtype, NaN / inf)."""
        feeds: dict[str, np.ndarray] = {}
        for sig in sigs:
            if sig.name not in obs:
                names = ", ".join(s.name for s in sigs)
                raise ObservationError(f"observation {sig.name!r} is missing (the policy needs: {names})")
            feeds[sig.name] = self._checked(sig, obs[sig.name], "observation", legend(sig))
        return feeds

    def _checked(self, sig: TensorSig, value: Any, what: str, legend: str) -> np.ndarray:
        array = np.asarray(value)
        if array.shape != sig.shape:
            raise ObservationError(
                f"{what} {sig.name!r} has shape {tuple(array.shape)}; the policy expects {sig.shape} {legend}"
            )
        if array.dtype != np.dtype(sig.dtype):
            raise ObservationError(f"{what} {sig.name!r} has dtype {array.dtype}; the policy expects {sig.dtype}")
        bad = first_non_finite(array) if array.dtype.kind == "f" else None
        if bad is not None:
            feature = self.spec.action if sig.name == BASE_ACTION else self.spec.features.get(sig.name)
            raise ObservationError(f"{what} {sig.name!r} contains NaN or inf (first at index {bad}, "
                                   f"dimension {dimension_name(feature, bad[-1])!r}: {array[bad]})")
        return np.ascontiguousarray(array)

    def _finite_action(self, action: np.ndarray, graph: str) -> np.ndarray:
        """``action`` as ``graph`` (or the checkpoint copy, on the torch backend) produced it, unless it
        holds a NaN / inf: then a :class:`NonFiniteActionError` naming the file and the first bad index."""
        bad = first_non_finite(action)
        if bad is None:
            return action
        source = self.folder / (CHECKPOINT_DIR if self.backend == "torch" else graph)
        raise NonFiniteActionError(
            f"{source} ({self.backend}) produced a non-finite action ({action[bad]} at action[{', '.join(map(str, bad))}], "
            f"dimension {dimension_name(self.spec.action, bad[-1])!r}) from a finite observation; it was not passed on "
            "(an observation far outside the training range, or broken weights?)"
        )

    def _legend(self, sig: TensorSig) -> str:
        if sig.name == NOISE:
            return "= [batch 1, Tp, Da]"
        return f"= [batch 1, To={self.spec.n_obs_steps}, {', '.join(map(str, sig.shape[2:]))}]"


class ExportedResidualPolicy(ExportedPolicy):
    """An exported residual-RL policy: the base's chunks (``policy.onnx``) plus the per-step
    correction (``residual.onnx``) that :class:`~robopolicy.train.evaluate.ChunkExecutor` and the
    ROS node apply to every executed action."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], backend: str,
        run: Callable[[dict[str, np.ndarray]], np.ndarray], seed: int,
        correct: Callable[[dict[str, np.ndarray]], np.ndarray],
    ) -> None:
        super().__init__(folder, manifest, backend, run, seed)
        # Callers pass one unbatched step; the graph takes batch 1.
        self.correction_inputs = [
            TensorSig(s.name, s.shape[1:], s.dtype) for s in map(TensorSig.from_dict, manifest[RESIDUAL]["inputs"])
        ]
        self._correct = correct

    def correct_action(self, obs: Mapping[str, Any], action: Any) -> np.ndarray:
        """The current raw observation ``{name: [*shape]}`` (one step, no batch or time axis; extra
        keys are ignored) and the planned action ``[Da]`` float32 -> the action to execute ``[Da]``.

        The same semantics as :meth:`robopolicy.rl.policy.ResidualPolicy.correct_action`, and the
        same checks as :meth:`predict_chunk` (missing, shape, dtype, NaN / inf, named; a non-finite
        result is a :class:`~robopolicy.export.errors.NonFiniteActionError`).
        """
        legend = "(one step: no batch or time axis)"
        feeds = self._observation_feeds(self.correction_inputs[:-1], obs, lambda _: legend)
        action_sig = self.correction_inputs[-1]
        feeds[action_sig.name] = self._checked(action_sig, action, "planned action", legend)
        return self._finite_action(self._correct({k: v[None] for k, v in feeds.items()}), RESIDUAL_FILE)[0]


def load_policy(path: Path, backend: str = "onnxruntime", seed: int = 0, threads: int = 1) -> ExportedPolicy:
    """Open the export folder ``path`` (or its ``policy.onnx`` / ``manifest.json``) with ``backend``.

    Returns an :class:`ExportedResidualPolicy` when the export has a residual correction.
    """
    folder = Path(path)
    if folder.is_file() and folder.name in (MODEL_FILE, MANIFEST_FILE):
        folder = folder.parent
    if backend not in BACKENDS:
        raise UnknownNameError("backend", backend, list(BACKENDS))
    manifest = read_manifest(folder)
    check_model_file(folder, manifest)
    if backend == "torch":
        run, correct = _torch_runners(folder, manifest)
    else:
        providers, options = _session_config(folder, manifest, backend, threads)
        run = _onnxruntime_runner(folder / MODEL_FILE, manifest["outputs"], providers, options)
        correct = None
        if RESIDUAL in manifest:
            correct = _onnxruntime_runner(folder / RESIDUAL_FILE, manifest[RESIDUAL]["outputs"], providers, options)
    if correct is None:
        return ExportedPolicy(folder, manifest, backend, run, seed)
    return ExportedResidualPolicy(folder, manifest, backend, run, seed, correct)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of an export folder, with its inputs checked against its spec
    (:func:`check_model_file` then checks it against the graphs)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST_FILE}"
        raise ModelFileError(f"{folder} {what}; expected an export folder written by `robopolicy export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFileError(f"{path} has format {found!r}, expected {MANIFEST_FORMAT!r}; export again with this robopolicy")
    missing = [k for k in ("model", "spec", "inputs", "outputs", "source", "checkpoint") if k not in manifest]
    missing += [f"model.{k}" for k in ("bytes", "sha256") if k not in manifest.get("model", {})]
    if RESIDUAL in manifest:
        missing += [f"{RESIDUAL}.{k}" for k in ("bytes", "sha256", "inputs", "outputs") if k not in manifest[RESIDUAL]]
    if missing:
        raise ModelFileError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    try:
        spec = FeatureSpec.from_dict(manifest["spec"])
        declared = _declared_graphs(manifest)
    except (KeyError, TypeError, ValueError, RobopolicyError) as e:
        raise ModelFileError(f"{path} has a malformed spec or inputs / outputs ({type(e).__name__}: {e})") from e
    expected = {MODEL_FILE: (graph_inputs(spec), graph_outputs(spec)),
                RESIDUAL_FILE: (correction_inputs(spec), correction_outputs(spec))}
    for file, sides in declared.items():
        for side, have, want in zip(("inputs", "outputs"), sides, expected[file]):
            if have != want:
                raise ModelFileError(
                    f"{path}: {side} of {file} {_sigs(have)} do not match its feature spec, which needs {_sigs(want)}"
                )
    return manifest


def _declared_graphs(manifest: dict[str, Any]) -> dict[str, tuple[list[TensorSig], list[TensorSig]]]:
    """``file -> (inputs, outputs)`` as the manifest declares them, for each graph of the export."""
    sections = {MODEL_FILE: manifest}
    if RESIDUAL in manifest:
        sections[RESIDUAL_FILE] = manifest[RESIDUAL]
    return {file: ([TensorSig.from_dict(d) for d in m["inputs"]], [TensorSig.from_dict(d) for d in m["outputs"]])
            for file, m in sections.items()}


def check_model_file(folder: Path, manifest: dict[str, Any]) -> None:
    """Each ``.onnx`` file of the export exists and has the manifest's size and SHA-256, its graph has
    the manifest's inputs / outputs, and every manifest field it was exported with is unchanged."""
    import onnx

    entries = {MODEL_FILE: manifest["model"], RESIDUAL_FILE: manifest.get(RESIDUAL)}
    for file, (inputs, outputs) in _declared_graphs(manifest).items():
        path = folder / file
        _check_file(path, entries[file])
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises several types for a damaged file
            raise ModelFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e
        initializers = {i.name for i in model.graph.initializer}
        actual = (
            [_sig_of(v) for v in model.graph.input if v.name not in initializers],
            [_sig_of(v) for v in model.graph.output],
        )
        for side, have, want in (("inputs", actual[0], inputs), ("outputs", actual[1], outputs)):
            if have != want:
                raise ModelFileError(f"{path}: graph {side} are {_sigs(have)} but the manifest says {_sigs(want)}")
        _check_bound_fields(path, {p.key: p.value for p in model.metadata_props}, folder / MANIFEST_FILE, manifest)


def _check_file(path: Path, entry: Mapping[str, Any]) -> None:
    """``path`` exists and has the size and SHA-256 its manifest ``entry`` records."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing (the manifest describes it)")
    size = path.stat().st_size
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ModelFileError(
            f"{path} does not match its manifest ({size} bytes, manifest says {entry['bytes']}; SHA-256 differs): "
            "the file is truncated, corrupt or was modified after export; export again"
        )


# -- manifest fields bound to a graph ------------------------------------------------------------
_ABSENT = object()


def bound_fields(sections: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest fields a graph carries (:data:`BOUND_FIELDS_KEY`), from the manifest ``sections`` it
    describes as known when it is written: whole sections, and the :data:`OPEN_SECTIONS` field by field."""
    fields: dict[str, Any] = {}
    for key, value in sections.items():
        if key in OPEN_SECTIONS:
            fields.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            fields[key] = value
    return fields


def _check_bound_fields(path: Path, metadata: Mapping[str, str], manifest_path: Path, manifest: Mapping[str, Any]) -> None:
    """Every manifest field the graph ``path`` carries in its ``metadata`` has the same value in ``manifest``."""
    try:
        fields = json.loads(metadata[BOUND_FIELDS_KEY])
    except (KeyError, json.JSONDecodeError):
        fields = None
    if not isinstance(fields, dict):
        raise ModelFileError(f"{path} carries no readable manifest fields (ONNX metadata {BOUND_FIELDS_KEY!r}): it was "
                             "not written by this robopolicy's export; export again")
    for key, exported in fields.items():
        have = _manifest_field(manifest, key)
        difference = None if have == exported else _first_difference(key, exported, have)
        if difference is None:
            continue
        where, want, got = difference
        said = f"has no {where}" if got is _ABSENT else f"says {where} = {_short(got)}"
        made = "without it" if want is _ABSENT else f"with {_short(want)}"
        raise ModelFileError(f"{manifest_path} {said} but {path.name} was exported {made}; the export folder was "
                             "edited after export: export again")


def _manifest_field(manifest: Mapping[str, Any], key: str) -> Any:
    """The manifest's value of a :func:`bound_fields` key (``"spec"``, ``"model.opset"``), or ``_ABSENT``."""
    section, _, name = key.partition(".")
    if name and section in OPEN_SECTIONS:
        value = manifest.get(section)
        return value.get(name, _ABSENT) if isinstance(value, dict) else _ABSENT
    return manifest.get(key, _ABSENT)


def _first_difference(where: str, want: Any, have: Any) -> tuple[str, Any, Any] | None:
    """``(path, want, have)`` of the first leaf where two JSON values differ (NaN equals NaN), else ``None``."""
    if isinstance(want, dict) and isinstance(have, dict):
        for key in [*want, *(k for k in have if k not in want)]:
            sub = f"{where}.{key}" if str(key).isidentifier() else f"{where}[{json.dumps(key)}]"
            found = _first_difference(sub, want.get(key, _ABSENT), have.get(key, _ABSENT))
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
        for i, (w, h) in enumerate(zip(want, have)):
            found = _first_difference(f"{where}[{i}]", w, h)
            if found:
                return found
        return None
    both_nan = isinstance(want, float) and isinstance(have, float) and math.isnan(want) and math.isnan(have)
    return None if both_nan or (want is not _ABSENT and have is not _ABSENT and want == have) else (where, want, have)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sig_of(value) -> TensorSig:
    import onnx

    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSig(value.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))


def _sigs(sigs: list[TensorSig]) -> str:
    return "[" + ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in sigs) + "]"


def torch_correction_args(feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], Any]:
    """Correction-graph feeds as the (observation, base action) tensors of ``ResidualPolicy.correct_action``."""
    import torch

    obs = {k: torch.from_numpy(v) for k, v in feeds.items() if k != BASE_ACTION}
    return obs, torch.from_numpy(feeds[BASE_ACTION])


def _session_config(folder: Path, manifest: dict[str, Any], backend: str, threads: int) -> tuple[list[Any], Any]:
    """ONNX Runtime providers and session options for ``backend`` (the same for every graph of the export)."""
    from robopolicy.export import tensorrt

    if backend == "tensorrt":
        tensorrt.require("backend 'tensorrt'", "use backend 'onnxruntime'")
        trt = manifest.get("tensorrt")
        if not trt:
            raise ModelFileError(f"{folder} was exported without --tensorrt: it has no TensorRT engine; export again with --tensorrt")
        return tensorrt.providers(folder / trt["cache_dir"], trt["fp16"]), None
    return ["CPUExecutionProvider"], session_options(threads)


def _onnxruntime_runner(path: Path, outputs: list[dict[str, Any]], providers: list[Any], options: Any):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types
        raise ModelFileError(f"ONNX Runtime cannot load {path}: {e}") from e
    output = outputs[0]["name"]
    return lambda feeds: session.run([output], feeds)[0]


def _torch_runners(folder: Path, manifest: dict[str, Any]):
    """(chunk runner, correction runner or ``None``) on the checkpoint copy, in eager torch, after checking
    the copy's files against the manifest (whose ``checkpoint`` section ``policy.onnx`` carries: the copy
    is the policy that was exported, spec and timing included)."""
    import torch

    from robopolicy.rl.policy import load_trained_policy

    ckpt = folder / CHECKPOINT_DIR
    for name, entry in manifest["checkpoint"].items():
        _check_file(ckpt / name, entry)
    policy = load_trained_policy(ckpt)

    @torch.inference_mode()
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        obs = {k: torch.from_numpy(v) for k, v in feeds.items() if k != NOISE}
        return policy.predict_chunk(obs, torch.from_numpy(feeds[NOISE])).numpy()

    def correct(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return policy.correct_action(*torch_correction_args(feeds)).numpy()

    return run, correct if RESIDUAL in manifest else None
