"""Checkpoints: safetensors for tensors, JSON for everything else. Never pickle.

A run folder holds ``checkpoints/step_NNNNNNN/`` directories and a ``checkpoints/last``
pointer. Each checkpoint is written into a hidden staging directory, fsynced and renamed
into place, and only then does ``last`` move (atomic rename): a run killed mid-save keeps
its previous checkpoint loadable.

Files of one checkpoint:

* ``policy.safetensors`` + ``policy.json``: the inference policy (EMA weights when EMA is
  on), its type, config, feature spec with statistics, dataset fingerprint.
* ``train_state.safetensors`` + ``train_state.json``: raw weights, optimizer moments,
  RNG states, step: what ``--resume`` needs to continue exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robopolicy import __version__
from robopolicy.atomic_io import write_bytes_atomic, write_json_atomic
from robopolicy.errors import CheckpointError, RobopolicyError
from robopolicy.policies.base import Policy
from robopolicy.spec import FeatureSpec

POLICY_WEIGHTS = "policy.safetensors"
POLICY_META = "policy.json"
TRAIN_WEIGHTS = "train_state.safetensors"
TRAIN_META = "train_state.json"
LAST = "last"


def dataset_fingerprint(root: Path) -> str:
    """A short hash of a dataset's metadata (info, stats, episode index)."""
    h = hashlib.sha256()
    meta = Path(root) / "meta"
    for name in ("info.json", "stats.json"):
        p = meta / name
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted((meta / "episodes").rglob("*.parquet")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def policy_metadata(policy: Policy, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from robopolicy.policies.factory import config_to_dict

    return {
        "format": "robopolicy.policy/1",
        "robopolicy_version": __version__,
        "type": policy.type,
        "config": config_to_dict(policy.config),
        "spec": policy.spec.to_dict(),
        **(extra or {}),
    }


def save_policy(folder: Path, policy: Policy, weights: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    """Write ``policy.safetensors`` + ``policy.json`` into ``folder`` (not atomic on its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(weights), str(folder / POLICY_WEIGHTS), metadata={"type": policy.type})
    write_json_atomic(folder / POLICY_META, policy_metadata(policy, extra))


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: Policy,
    inference_weights: dict[str, torch.Tensor],
    train_weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    train_meta: dict[str, Any],
    policy_extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Atomically write checkpoint ``step`` and point ``last`` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    stage = ckpt_root / f".{final.name}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    save_policy(stage, policy, inference_weights, {**policy_extra, "step": step})
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors = {**{f"model.{k}": v for k, v in train_weights.items()}, **opt_tensors,
               "rng.torch": torch.get_rng_state()}
    save_file(_contiguous(tensors), str(stage / TRAIN_WEIGHTS))
    write_json_atomic(stage / TRAIN_META, {**train_meta, "step": step, "optimizer": opt_meta})
    return commit_checkpoint(stage, final, keep)


def commit_checkpoint(stage: Path, final: Path, keep: int) -> Path:
    """Make the fully written ``stage`` folder the checkpoint ``final``, move ``last`` to it
    (atomic rename) and prune all but the ``keep`` newest ``step_*`` checkpoints."""
    root = final.parent
    for f in stage.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(stage, final)
    write_bytes_atomic(root / LAST, final.name.encode())
    older = sorted(p for p in root.glob("step_*") if p != final)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (via ``last``) or a checkpoint folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / POLICY_META).is_file():
        return path
    last = path / "checkpoints" / LAST
    if last.is_file():
        target = path / "checkpoints" / last.read_text().strip()
        if (target / POLICY_META).is_file():
            return target
        raise CheckpointError(f"{last} points at {target.name}, which is missing or incomplete")
    raise CheckpointError(f"{path} is neither a run folder (no checkpoints/last) nor a checkpoint (no {POLICY_META})")


def read_policy_meta(ckpt: Path) -> dict[str, Any]:
    p = Path(ckpt) / POLICY_META
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is unreadable or corrupt: {e}") from e
    if meta.get("format") != "robopolicy.policy/1" or "type" not in meta:
        raise CheckpointError(f"{p} is not a robopolicy policy description")
    return meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from e


def load_policy(path: Path, expect_type: str | None = None) -> Policy:
    """Load the inference policy of a run or checkpoint folder, in eval mode."""
    from robopolicy.policies.factory import config_from_dict, policy_class

    ckpt = resolve_checkpoint(path)
    meta = read_policy_meta(ckpt)
    if expect_type is not None and meta["type"] != expect_type:
        raise CheckpointError(f"{ckpt} holds a {meta['type']!r} policy but a {expect_type!r} policy was asked for")
    try:
        config = config_from_dict(meta["type"], meta["config"])
        spec = FeatureSpec.from_dict(meta["spec"])
    except RobopolicyError as e:
        raise CheckpointError(f"{ckpt / POLICY_META}: {e}") from e
    policy = policy_class(meta["type"])(config, spec)
    load_weights(policy, load_tensors(ckpt / POLICY_WEIGHTS), f"{ckpt / POLICY_WEIGHTS}")
    policy.checkpoint_meta = meta
    return policy.eval()


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names the file and the mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
            if keys
        )
        raise CheckpointError(f"weights in {source} do not fit the {type(module).__name__} it describes ({detail})")
    module.load_state_dict(weights)


def load_train_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model weights, optimizer state_dict, train meta) for ``--resume``."""
    tensors = load_tensors(Path(ckpt) / TRAIN_WEIGHTS)
    try:
        meta = json.loads((Path(ckpt) / TRAIN_META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt) / TRAIN_META} is unreadable or corrupt: {e}") from e
    torch.set_rng_state(tensors["rng.torch"])
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, optimizer_from_flat(tensors, meta["optimizer"]), meta
