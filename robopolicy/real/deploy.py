"""``robopolicy deploy``: run the policy node in closed loop and report how it went.

Starts the policy node as a child process with the parameter file (the same nodes and
file ``ros2 launch robopolicy_ros policy.launch.py`` uses, see
:mod:`robopolicy.real.nodes`), and with ``sim`` the sim bridge too; configures and
activates the policy node through its lifecycle services; runs ``episodes`` sim episodes
(or, on a robot, until ``duration_s`` or Ctrl-C); then deactivates, cleans up and tears
the processes down (SIGINT, then SIGTERM, then SIGKILL). Every process gets the same
private ``ROS_DOMAIN_ID`` and keeps DDS on this machine unless told otherwise.

The report: success rate, the control loop's timing (obs-to-command latency, inference
time, timer period and jitter, missed deadlines), safety interventions and rejected
observations; printed as a table, written as ``deploy.json`` and ``latency.png``, with every
telemetry record in ``telemetry.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from robopolicy.atomic_io import write_json_atomic
from robopolicy.errors import RobopolicyError
from robopolicy.progress import progress as progress_bar
from robopolicy.real.nodes import POLICY, SIM_BRIDGE, check_params_file, pick_domain_id, ros_environment
from robopolicy.real.telemetry import CYCLE_FIELDS, INFERENCE_FIELDS, TimingSummary, summarize

#: Teardown: how long each signal gets before the next, stronger one.
SIGINT_WAIT_S, SIGTERM_WAIT_S = 10.0, 5.0


@dataclass
class DeployReport:
    """What a deploy run measured; :meth:`table` is what ``robopolicy deploy`` prints."""

    model: str
    params: str
    sim: str | None
    domain_id: int
    seconds: float
    episodes: list[dict[str, Any]]
    timing: TimingSummary
    interventions: dict[str, int]
    rejected: dict[str, int]
    missed_inference_deadlines: int
    out: str
    files: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float | None:
        return sum(e["success"] for e in self.episodes) / len(self.episodes) if self.episodes else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "success_rate": self.success_rate}

    def table(self) -> str:
        t = self.timing
        lines = []
        if self.sim:
            from robopolicy.stats import wilson_interval

            wins, n = sum(e["success"] for e in self.episodes), len(self.episodes)
            lo, hi = wilson_interval(wins, n)
            rate = f"{self.success_rate:.0%}" if n else "n/a"
            lines.append(f"deploy on sim {self.sim!r}: success {rate} ({wins}/{n}), 95% CI [{lo:.0%}, {hi:.0%}],"
                         f" {self.seconds:.0f} s")
        else:
            lines.append(f"deploy: {self.seconds:.0f} s on the robot")
        lines.append(f"control {t.control_rate_hz:g} Hz: {t.cycles} cycles, period {t.period_ms_mean:.2f} ms mean, "
                     f"jitter std {t.period_jitter_ms:.2f} ms, missed control deadlines {t.missed_control_deadlines}")
        lines.append(f"{'latency (ms)':<28}{'p50':>8}{'p99':>8}{'max':>8}{'n':>8}")
        rows = [("obs-to-command", t.obs_to_command_ms), ("stamp-to-command", t.stamp_to_command_ms),
                ("control cycle", t.cycle_ms), ("inference", t.inference_ms)]
        if t.correction_ms.n:
            rows.insert(3, ("per-step correction", t.correction_ms))
        for label, p in rows:
            lines.append(f"{label:<28}{p.p50:>8.2f}{p.p99:>8.2f}{p.max:>8.2f}{p.n:>8}")
        lines.append(f"chunks {t.chunks} (late {t.late_chunks}), missed inference deadlines "
                     f"{self.missed_inference_deadlines}, held cycles {t.held_cycles}")
        interventions = ", ".join(f"{k} {v}" for k, v in self.interventions.items())
        lines.append(f"safety interventions: {interventions or 'none'}")
        if self.rejected:
            lines.append("rejected observations: " + ", ".join(f"{k} {v}" for k, v in self.rejected.items()))
        lines += [f"wrote {f}" for f in self.files]
        return "\n".join(lines)


def deploy(
    model: str | Path,
    params: str | Path,
    sim: str | None = None,
    episodes: int = 10,
    duration_s: float | None = None,
    out: str | Path | None = None,
    domain_id: int | None = None,
    startup_timeout_s: float = 180.0,
    progress: bool = True,
) -> DeployReport:
    """Run ``model`` through the policy node with ``params``; see the module docstring.

    With ``sim`` (an env name) the sim bridge stands in for the robot and the run ends after
    ``episodes`` episodes (or ``duration_s``); without it the node drives the robot until
    ``duration_s`` or Ctrl-C. ``out`` defaults to ``<model>/deploy/<timestamp>``.
    """
    model, params = Path(model).expanduser().resolve(), Path(params).expanduser().resolve()
    if not model.exists():
        raise RobopolicyError(f"model path {model} does not exist")
    applied = check_params_file(params)
    out_dir = Path(out) if out is not None else model / "deploy" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    domain = pick_domain_id(domain_id, robot=sim is None)
    control_rate = float(applied[POLICY.name]["control_rate_hz"])
    processes = _Processes(out_dir, ros_environment(domain))
    start = time.monotonic()
    try:
        processes.start("policy", POLICY.command(
            [params, POLICY.overrides_file(out_dir / "policy_overrides.yaml", {"model": str(model)})]))
        if sim:
            processes.start("sim_bridge", SIM_BRIDGE.command(
                [params, SIM_BRIDGE.overrides_file(out_dir / "sim_bridge_overrides.yaml", {"env": sim})]))
        cycles, inference, episode_results, diag = _run(
            processes, domain, sim, applied[SIM_BRIDGE.name]["result_topic"], episodes, duration_s, startup_timeout_s,
            progress)
    finally:
        processes.stop()
    rep = DeployReport(
        model=str(model), params=str(params), sim=sim, domain_id=domain, seconds=time.monotonic() - start,
        episodes=episode_results, timing=summarize(cycles, inference, control_rate),
        interventions=_counters(diag, "intervention."), rejected=_counters(diag, "rejected."),
        missed_inference_deadlines=int(diag.get("missed_inference_deadlines", 0)), out=str(out_dir),
    )
    np.savez(out_dir / "telemetry.npz", cycles=cycles, inference=inference, cycle_fields=np.array(CYCLE_FIELDS),
             inference_fields=np.array(INFERENCE_FIELDS))
    rep.files = [str(_plot(cycles, inference, control_rate, out_dir / "latency.png")), str(out_dir / "deploy.json"),
                 str(out_dir / "telemetry.npz")]
    write_json_atomic(out_dir / "deploy.json", {**rep.to_dict(), "diagnostics": diag})
    print(rep.table())
    return rep


def _run(
    processes: "_Processes", domain: int, sim: str | None, result_topic: str, episodes: int,
    duration_s: float | None, startup_timeout_s: float, progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], dict[str, str]]:
    """Drive the policy node over DDS; returns (cycles, inference, episodes, final diagnostics)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    from robopolicy.real.client import PolicyClient

    context = Context()
    rclpy.init(context=context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    client = PolicyClient(context, bridge=SIM_BRIDGE.name if sim else None, result_topic=result_topic if sim else "")
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not client.ready(1.0):
            processes.check()
            if time.monotonic() > deadline:
                raise RobopolicyError(f"the nodes did not come up within {startup_timeout_s:.0f} s; "
                                      f"logs in {processes.out_dir}")
        if not client.transition("configure", timeout_s=startup_timeout_s):
            client.wait_for(lambda c: c.diagnostics is not None and "configure failed" in c.diagnostics.message, 5.0)
            reason = client.diagnostics.message if client.diagnostics is not None else "see the node's log"
            raise RobopolicyError(f"the policy node did not configure: {reason} (log: {processes.log('policy')})")
        if not client.transition("activate"):
            raise RobopolicyError(f"the policy node did not activate (log: {processes.log('policy')})")
        first = json.loads(client.trigger("reset").message)["episode"] if sim else 0
        _wait_until_done(client, processes, sim, first, episodes, duration_s, progress)
        client.transition("deactivate")
        client.wait_for(lambda c: c.diagnostic_values().get("state") == "inactive" and c.all_telemetry_received(), 10.0)
        diag = client.diagnostic_values()
        client.transition("cleanup")
        cycles, inference = client.tables()
        results = sorted((e for e in client.episodes if e["episode"] >= first), key=lambda e: e["episode"])
        return cycles, inference, results[:episodes] if sim else [], diag
    finally:
        client.close()
        context.try_shutdown()


def _wait_until_done(client: Any, processes: "_Processes", sim: str | None, first: int, episodes: int,
                     duration_s: float | None, progress: bool) -> None:
    end = time.monotonic() + duration_s if duration_s else float("inf")
    bar = progress_bar(total=episodes if sim else None, desc=f"deploy {sim or 'robot'}", unit="ep" if sim else "s",
                       disable=not progress)

    def done(c: Any) -> list[dict[str, Any]]:
        return [e for e in c.episodes if e["episode"] >= first]

    try:
        while time.monotonic() < end:
            processes.check()
            if sim:
                finished = done(client)
                bar.update_to(len(finished))
                bar.set_postfix(success=f"{sum(e['success'] for e in finished)}/{len(finished)}")
                if len(finished) >= episodes:
                    break
                client.wait_for(lambda c: len(done(c)) > len(finished), 1.0)
            else:
                time.sleep(min(1.0, max(end - time.monotonic(), 0.0)))
                bar.update(1)
    except KeyboardInterrupt:
        bar.write("interrupted: stopping the policy node")
    finally:
        bar.close()


def _counters(diag: dict[str, str], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: int(v) for k, v in diag.items() if k.startswith(prefix) and v.isdigit()}


class _Processes:
    """Child node processes: started with subprocess (not fork), logged to files, torn down in order."""

    def __init__(self, out_dir: Path, env: dict[str, str]) -> None:
        self.out_dir, self.env = out_dir, env
        self.procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def log(self, name: str) -> Path:
        return self.out_dir / f"{name}.log"

    def start(self, name: str, cmd: list[str]) -> None:
        log = open(self.log(name), "wb")
        # A new session: a Ctrl-C in the terminal reaches deploy only, which then stops them in order.
        self.procs[name] = (subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True), log)

    def check(self) -> None:
        for name, (proc, _) in self.procs.items():
            if proc.poll() is not None:
                tail = self.log(name).read_text(errors="replace").strip().splitlines()[-15:]
                raise RobopolicyError(f"the {name} process exited with code {proc.returncode}:\n  "
                                      + "\n  ".join(tail))

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGINT, SIGINT_WAIT_S), (signal.SIGTERM, SIGTERM_WAIT_S), (signal.SIGKILL, 5.0)):
            alive = [p for p, _ in self.procs.values() if p.poll() is None]
            for p in alive:
                p.send_signal(sig)
            deadline = time.monotonic() + wait_s
            for p in alive:
                try:
                    p.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
        for _, log in self.procs.values():
            log.close()


def _plot(cycles: np.ndarray, inference: np.ndarray, control_rate: float, path: Path) -> Path:
    """Histograms of obs-to-command latency, inference time and control period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("obs-to-command latency (ms)", cycles[:, CYCLE_FIELDS.index("obs_to_command_ms")]),
        ("inference time (ms)", inference[:, INFERENCE_FIELDS.index("inference_ms")]),
        (f"control period (ms), nominal {1e3 / control_rate:.1f}", cycles[:, CYCLE_FIELDS.index("period_ms")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, values) in zip(axes, panels):
        v = values[np.isfinite(values)]
        if v.size:
            ax.hist(v, bins=60, color="tab:blue")
            for q, style in ((50, "--"), (99, ":")):
                ax.axvline(np.percentile(v, q), color="k", linestyle=style, label=f"p{q} {np.percentile(v, q):.2f}")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
