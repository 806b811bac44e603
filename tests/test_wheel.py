"""The package works when installed from a wheel, not only as an editable install: its data
files (MJCF scenes, the Fast DDS profile, the deploy parameter files) ship inside it.

Builds a wheel from a copy of the sources (so the checkout gets no build/ or egg-info), installs
it with ``pip install --no-deps --target``, and in a subprocess outside the repository, with
only that folder on ``PYTHONPATH`` ahead of the venv, builds and resets every built-in env and
runs ``python -m robopolicy.cli envs``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECK = r"""
import os, sys
from pathlib import Path
import robopolicy
from robopolicy import paths
from robopolicy.sim.registry import env_entry, env_names, make_env

target = Path(sys.argv[1]).resolve()
assert Path(robopolicy.__file__).resolve().is_relative_to(target), robopolicy.__file__
for path in (paths.SIM_ASSETS, paths.FASTDDS_PROFILE, *(paths.deploy_params(e) for e in paths.DEPLOY_PARAMS)):
    assert path.resolve().is_relative_to(target) and path.exists(), path
builtin = [n for n in env_names() if env_entry(n).source == "builtin"]
assert {"push", "multitask", "lift"} <= set(builtin), builtin
for name in builtin:
    env = make_env(name)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()
    print("built", name)
"""


def test_wheel_installs_and_builds_every_env(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "robopolicy", src / "robopolicy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    wheels = tmp_path / "wheels"
    # No build isolation: the suite runs offline, and the venv already has setuptools.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("robopolicy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "robopolicy" / "assets").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(target), str(wheel)], check=True, cwd=tmp_path)
    assert not (target / "sim").exists() and not (target / "real").exists()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBOPOLICY_SIM_ASSETS")}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "built push" in run.stdout and "built multitask" in run.stdout

    listed = subprocess.run([sys.executable, "-m", "robopolicy.cli", "envs"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for name in ("push", "multitask", "lift", "can", "stack"):
        assert any(line.split()[:1] == [name] for line in listed.stdout.splitlines()), listed.stdout

