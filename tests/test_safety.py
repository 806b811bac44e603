"""The safety layer, rule by rule (pure Python: no ROS)."""

from __future__ import annotations

import numpy as np
import pytest

from robopolicy.errors import RobopolicyError
from robopolicy.real import safety
from robopolicy.real.safety import Decision, EStop, SafetyFilter, SafetyLimits, Watchdog


def limits(hold: tuple[str, ...] = ("zero",), max_delta: float = 10.0) -> SafetyLimits:
    return SafetyLimits(np.array([-1.0, 0.0]), np.array([1.0, 2.0]), np.full(2, max_delta), hold)


def test_passes_a_safe_command_unchanged() -> None:
    f = SafetyFilter(limits())
    d = f.apply(np.array([0.5, 1.5]))
    assert d == Decision(d.command, ()) and np.allclose(d.command, [0.5, 1.5]) and not d.held
    assert sum(f.counts.values()) == 0


def test_clamps_to_the_limits_and_counts() -> None:
    f = SafetyFilter(limits())
    d = f.apply(np.array([-3.0, 2.5]))
    assert np.allclose(d.command, [-1.0, 2.0])
    assert d.reasons == (safety.CLAMPED,) and f.counts[safety.CLAMPED] == 1 and not d.held


def test_limits_the_change_per_cycle_from_the_last_command() -> None:
    f = SafetyFilter(limits(max_delta=0.25))
    f.apply(np.array([0.0, 0.0]))
    d = f.apply(np.array([1.0, -0.1]))
    assert np.allclose(d.command, [0.25, 0.0])  # x rate-limited; y clamped to the lower limit 0
    assert set(d.reasons) == {safety.CLAMPED, safety.RATE_LIMITED}
    assert np.allclose(f.apply(np.array([1.0, 0.0])).command, [0.5, 0.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_actions_and_holds(bad: float) -> None:
    f = SafetyFilter(limits(hold=("last",)))
    f.apply(np.array([0.3, 0.4]))
    d = f.apply(np.array([bad, 0.5]))
    assert d.reasons == (safety.NON_FINITE_ACTION,) and d.held
    assert np.allclose(d.command, [0.3, 0.4])


def test_hold_zero_ramps_down_under_the_rate_limit_and_is_clamped_into_the_limits() -> None:
    f = SafetyFilter(limits(max_delta=0.5))
    f.apply(np.array([1.0, 1.0]))
    first = f.apply(None, safety.STALE_OBSERVATION)
    assert np.allclose(first.command, [0.5, 0.5]) and first.held
    assert set(first.reasons) == {safety.STALE_OBSERVATION, safety.RATE_LIMITED}
    assert np.allclose(f.apply(None, safety.STALE_OBSERVATION).command, [0.0, 0.0])
    assert f.counts[safety.STALE_OBSERVATION] == 2
    # zero lies outside [1, 2]: it is clamped into the limits.
    shifted = SafetyFilter(SafetyLimits(np.array([1.0]), np.array([2.0]), np.array([10.0])))
    assert np.allclose(shifted.apply(None, safety.NO_OBSERVATION).command, [1.0])


def test_hold_now_is_unlimited_and_later_commands_ramp_from_it() -> None:
    f = SafetyFilter(limits(hold=("zero", "last"), max_delta=0.25))
    f.apply(np.array([0.5, 1.0]))
    f.apply(np.array([0.75, 1.25]))
    np.testing.assert_allclose(f.hold_now(), [0.0, 1.25])  # no ramp: deactivate stops now
    assert np.allclose(f.apply(np.array([1.0, 1.25])).command, [0.25, 1.25])


def test_hold_per_dimension_and_nothing_to_hold_before_the_first_command() -> None:
    f = SafetyFilter(limits(hold=("zero", "last")))
    d = f.apply(None, safety.WAITING_FOR_POLICY)
    assert d.command is None and d.held  # "last" has no value yet: send nothing
    f.apply(np.array([0.7, 1.2]))
    assert np.allclose(f.apply(None, safety.MISSED_DEADLINE).command, [0.0, 1.2])


def test_estop_latches_holds_at_once_and_only_reset_clears_it() -> None:
    stop = EStop()
    f = SafetyFilter(limits(max_delta=0.1), stop)
    f.apply(np.array([0.1, 0.1]))
    f.apply(np.array([0.2, 0.2]))
    assert stop.trigger("test") and not stop.trigger("again") and stop.reason == "test" and stop.triggers == 2
    for _ in range(3):
        d = f.apply(np.array([0.3, 0.3]))
        assert d.reasons == (safety.ESTOP,) and np.allclose(d.command, [0.0, 0.0])  # no ramp
    assert f.counts[safety.ESTOP] == 3
    assert stop.reset() and not stop.reset() and not stop.active
    assert np.allclose(f.apply(np.array([0.05, 0.05])).command, [0.05, 0.05])


def test_watchdog_reasons_in_order_and_counts_each_missed_deadline_once() -> None:
    w = Watchdog(staleness_s=0.2)
    assert w.check(10.0, None, None) == safety.NO_OBSERVATION
    assert w.check(10.0, 9.7, None) == safety.STALE_OBSERVATION
    assert w.check(10.0, 9.9, None) == safety.WAITING_FOR_POLICY
    assert w.check(10.0, 9.9, 10.5) is None
    assert w.check(10.6, 10.5, 10.5) == safety.MISSED_DEADLINE
    assert w.check(10.7, 10.6, 10.5) == safety.MISSED_DEADLINE
    assert w.missed_deadlines == 1
    assert w.check(10.8, 10.7, 11.3) is None  # a new plan
    w.check(11.4, 11.3, 11.3)
    assert w.missed_deadlines == 2


@pytest.mark.parametrize(
    "lower, upper, max_delta, hold, message",
    [
        ([0.0], [1.0, 2.0], [1.0], ("zero",), "one value per action dimension"),
        ([1.0], [1.0], [1.0], ("zero",), "lower < upper"),
        ([0.0], [np.nan], [1.0], ("zero",), "finite"),
        ([0.0], [1.0], [0.0], ("zero",), "max_delta must be > 0"),
        ([0.0, 0.0], [1.0, 1.0], [1.0, 1.0], ("zero", "last", "zero"), "once or per dimension"),
        ([0.0], [1.0], [1.0], ("brake",), "'last' or 'zero'"),
    ],
)
def test_limits_are_validated(lower, upper, max_delta, hold, message) -> None:
    with pytest.raises(RobopolicyError, match=message):
        SafetyLimits(np.array(lower), np.array(upper), np.array(max_delta), hold)


def test_watchdog_needs_a_positive_staleness_limit() -> None:
    with pytest.raises(RobopolicyError, match="staleness"):
        Watchdog(0.0)
