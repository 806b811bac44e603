"""robopolicy.progress: a tqdm bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import threading

import pytest

from robopolicy import progress as P


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBOPOLICY_PROGRESS", raising=False)
    monkeypatch.delenv("ROBOPOLICY_PROGRESS_INTERVAL", raising=False)


def test_a_log_gets_a_handful_of_lines_not_an_update_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = P.progress(total=1000, desc="train", unit="step", file=out)
    assert isinstance(bar, P.LogProgress)
    for i in range(1000):
        now[0] += 0.05  # 50 s in all: a line every 10 s
        bar.update(1)
        if i % 100 == 0:
            bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
    bar.close()
    bar.close()  # idempotent
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 4 <= len(lines) <= 6, lines
    assert lines[0].startswith("train: 200/1000 step (20%), 20 step/s, ETA 00:40")
    assert lines[-1].startswith("train: done 1000/1000 step in 00:") and lines[-1].endswith(", 20 step/s, loss=0.0011")


def test_a_fast_loop_still_ends_with_a_final_line() -> None:
    out = io.StringIO()
    for _ in P.progress(range(1000), desc="eval push", unit="ep", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval push: done 1000/1000 ep in")


def test_interval_and_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    monkeypatch.setenv("ROBOPOLICY_PROGRESS_INTERVAL", "1")
    out = io.StringIO()
    with P.progress(total=None, desc="deploy robot", unit="s", file=out) as bar:
        for n in range(1, 6):
            now[0] += 1.0
            bar.update_to(n)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["deploy robot: 1 s, 1 s/s", "deploy robot: 2 s, 1 s/s"] and len(lines) == 6
    monkeypatch.setenv("ROBOPOLICY_PROGRESS", "off")
    out = io.StringIO()
    bar = P.progress(total=3, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    monkeypatch.setenv("ROBOPOLICY_PROGRESS", "bar")
    assert isinstance(P.progress(total=3, file=io.StringIO(), disable=True), P._Off)


def test_a_terminal_gets_a_tqdm_bar() -> None:
    tty = FakeTTY()
    bar = P.progress(total=50, initial=10, desc="train", unit="step", file=tty)
    assert isinstance(bar, P.tqdm)
    for _ in range(40):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.update_to(50)
    bar.close()
    text = tty.getvalue()
    assert "\r" in text and "50/50" in text and "loss=0.1" in text and "step/s" in text


def test_disabled_writes_nothing_but_keeps_count() -> None:
    out = io.StringIO()
    bar = P.progress(range(5), total=5, disable=True, file=out)
    assert list(bar) == list(range(5))
    bar.update(2)
    bar.set_postfix({"a": 1})
    bar.close()
    assert out.getvalue() == "" and bar.n == 2


def test_write_goes_between_lines_and_threads_do_not_interleave(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOPOLICY_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    bar = P.progress(total=4000, desc="rl", unit="step", file=out)

    def work() -> None:
        for _ in range(1000):
            bar.update(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    P.write("step 10: eval success 50%", file=out)
    for t in threads:
        t.join()
    bar.close()
    lines = out.getvalue().splitlines()
    assert bar.n == 4000 and "step 10: eval success 50%" in lines
    assert all(line.startswith("rl: ") or line.startswith("step 10") for line in lines)
    assert lines[-1].startswith("rl: done 4000/4000 step")
