"""The safety layer, rule by rule (pure Python: no ROS)."""

from __future__ import annotations

import numpy as np
import pytest

from robopolicy.errors import RobopolicyError
from robopolicy.real import safety
from robopolicy.real.safety import Decision, EStop, SafetyFilter, SafetyLimits, Watchdog

PERIOD = 0.02


def limits(hold: tuple[str, ...] = ("zero",), max_delta: float = 10.0, max_rate: float = 1e6,
           position: tuple[bool, ...] = ()) -> SafetyLimits:
    return SafetyLimits(np.array([-1.0, 0.0]), np.array([1.0, 2.0]), np.full(2, max_delta), np.full(2, max_rate),
                        hold, position)


class Clocked:
    """A :class:`SafetyFilter` whose cycles run one nominal period apart (``step`` changes that)."""

    def __init__(self, lim: SafetyLimits, estop: EStop | None = None) -> None:
        self.f = SafetyFilter(lim, PERIOD, estop or EStop())
        self.now = 100.0

    def __call__(self, proposed, hold_reason=None, measured=None, step: float = PERIOD) -> Decision:
        self.now += step
        return self.f.apply(None if proposed is None else np.asarray(proposed, dtype=float), self.now,
                            hold_reason, None if measured is None else np.asarray(measured, dtype=float))


def test_passes_a_safe_command_unchanged() -> None:
    f = Clocked(limits())
    d = f([0.5, 1.5])
    assert d == Decision(d.command, ()) and np.allclose(d.command, [0.5, 1.5]) and not d.held
    assert sum(f.f.counts.values()) == 0


def test_clamps_to_the_limits_and_counts() -> None:
    f = Clocked(limits())
    d = f([-3.0, 2.5])
    assert np.allclose(d.command, [-1.0, 2.0])
    assert d.reasons == (safety.CLAMPED,) and f.f.counts[safety.CLAMPED] == 1 and not d.held


def test_limits_the_change_per_cycle_from_the_last_command() -> None:
    f = Clocked(limits(max_delta=0.25))
    f([0.0, 0.0])
    d = f([1.0, -0.1])
    assert np.allclose(d.command, [0.25, 0.0])  # x rate-limited; y clamped to the lower limit 0
    assert set(d.reasons) == {safety.CLAMPED, safety.RATE_LIMITED}
    assert np.allclose(f([1.0, 0.0]).command, [0.5, 0.0])


def test_slew_is_per_second_so_a_burst_of_cycles_moves_a_bursts_worth() -> None:
    f = Clocked(limits(max_delta=0.5, max_rate=10.0))  # 10 /s: 0.2 per 20 ms period
    f([0.0, 0.0])
    assert np.allclose(f([1.0, 1.0]).command, [0.2, 0.2])  # a whole period: 0.2
    burst = [f([1.0, 1.0], step=0.001).command[0] for _ in range(9)]  # 9 cycles 1 ms apart
    assert np.allclose(np.diff([0.2, *burst]), 0.01) and np.isclose(burst[-1], 0.29)
    assert np.allclose(f([1.0, 1.0], step=0.2).command, [0.79, 0.79])  # a late cycle: max_delta caps it


def test_the_first_command_ramps_up_from_zero_for_velocity_dimensions() -> None:
    f = Clocked(limits(max_rate=10.0))
    assert np.allclose(f([1.0, 1.0]).command, [0.2, 0.2])


def test_position_dimensions_start_from_the_measured_state_after_start_hold_and_estop() -> None:
    stop = EStop()
    f = Clocked(limits(hold=("last",), max_rate=5.0, position=(True, False)), stop)  # 0.1 per period
    d = f([0.9, 1.0])
    assert d.command is None and d.reasons == (safety.NO_MEASURED_STATE,)  # nothing measured: send nothing
    d = f([0.9, 1.0], measured=[-0.5, np.nan])
    assert np.allclose(d.command, [-0.4, 0.1])  # from the robot's -0.5, not from 0; velocity dim from 0
    for _ in range(3):
        d = f([0.9, 1.0], measured=[-0.5, np.nan])
    assert np.allclose(d.command, [-0.1, 0.4])  # continuing: from the last command
    f(None, safety.STALE_OBSERVATION)  # a hold; meanwhile the arm was pushed to 0.6
    d = f([0.9, 1.0], measured=[0.6, np.nan])
    assert np.allclose(d.command, [0.7, 0.5])  # resumes from where the robot is
    stop.trigger("test")
    f([0.9, 1.0], measured=[0.6, np.nan])
    stop.reset()
    d = f([-1.0, 1.0], measured=[0.65, np.nan])
    assert np.allclose(d.command, [0.55, 0.6])  # after the e-stop reset: from the measured 0.65
    f.f.reset()  # deactivate / activate
    assert np.allclose(f([0.0, 1.0], measured=[0.3, np.nan]).command, [0.2, 0.1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_actions_and_holds(bad: float) -> None:
    f = Clocked(limits(hold=("last",)))
    f([0.3, 0.4])
    d = f([bad, 0.5])
    assert d.reasons == (safety.NON_FINITE_ACTION,) and d.held
    assert np.allclose(d.command, [0.3, 0.4])


def test_hold_zero_ramps_down_under_the_rate_limit_and_is_clamped_into_the_limits() -> None:
    f = Clocked(limits(max_delta=0.5))
    f([1.0, 1.0])
    assert np.allclose(f([1.0, 1.0]).command, [1.0, 1.0])
    first = f(None, safety.STALE_OBSERVATION)
    assert np.allclose(first.command, [0.5, 0.5]) and first.held
    assert set(first.reasons) == {safety.STALE_OBSERVATION, safety.RATE_LIMITED}
    assert np.allclose(f(None, safety.STALE_OBSERVATION).command, [0.0, 0.0])
    assert f.f.counts[safety.STALE_OBSERVATION] == 2
    # zero lies outside [1, 2]: it is clamped into the limits.
    shifted = SafetyFilter(SafetyLimits(np.array([1.0]), np.array([2.0]), np.array([10.0]), np.array([np.inf])),
                           PERIOD)
    assert np.allclose(shifted.apply(None, 1.0, safety.NO_OBSERVATION).command, [1.0])


def test_hold_now_is_unlimited_and_later_commands_ramp_from_it() -> None:
    f = Clocked(limits(hold=("zero", "last"), max_delta=0.25))
    f([0.25, 0.25])
    f([0.5, 0.5])
    np.testing.assert_allclose(f.f.hold_now(f.now), [0.0, 0.5])  # no ramp: deactivate stops now
    assert np.allclose(f([1.0, 0.5]).command, [0.25, 0.5])


def test_hold_per_dimension_and_nothing_to_hold_before_the_first_command() -> None:
    f = Clocked(limits(hold=("zero", "last")))
    d = f(None, safety.WAITING_FOR_POLICY)
    assert d.command is None and d.held  # "last" has no value yet: send nothing
    f([0.7, 1.2])
    assert np.allclose(f(None, safety.MISSED_DEADLINE).command, [0.0, 1.2])


def test_estop_latches_holds_at_once_and_only_reset_clears_it() -> None:
    stop = EStop()
    f = Clocked(limits(max_delta=0.1), stop)
    f([0.1, 0.1])
    f([0.2, 0.2])
    assert stop.trigger("test") and not stop.trigger("again") and stop.reason == "test" and stop.triggers == 2
    for _ in range(3):
        d = f([0.3, 0.3])
        assert d.reasons == (safety.ESTOP,) and np.allclose(d.command, [0.0, 0.0])  # no ramp
    assert f.f.counts[safety.ESTOP] == 3
    assert stop.reset() and not stop.reset() and not stop.active
    assert np.allclose(f([0.5, 0.5]).command, [0.1, 0.1])  # ramps up from the stop


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
    "lower, upper, max_delta, hold, position, message",
    [
        ([0.0], [1.0, 2.0], [1.0], ("zero",), (), "one value per action dimension"),
        ([1.0], [1.0], [1.0], ("zero",), (), "lower < upper"),
        ([0.0], [np.nan], [1.0], ("zero",), (), "finite"),
        ([0.0], [1.0], [0.0], ("zero",), (), "max_delta must be > 0"),
        ([0.0, 0.0], [1.0, 1.0], [1.0, 1.0], ("zero", "last", "zero"), (), "once or per dimension"),
        ([0.0], [1.0], [1.0], ("brake",), (), "'last' or 'zero'"),
        ([0.0], [1.0], [1.0], ("zero",), (True,), "must hold 'last'"),
        ([0.0], [1.0], [1.0], ("last",), (True, False), "one flag per action dimension"),
    ],
)
def test_limits_are_validated(lower, upper, max_delta, hold, position, message) -> None:
    with pytest.raises(RobopolicyError, match=message):
        SafetyLimits(np.array(lower), np.array(upper), np.array(max_delta), np.ones(len(max_delta)), hold, position)


def test_max_rate_is_validated() -> None:
    with pytest.raises(RobopolicyError, match="max_rate must be > 0"):
        SafetyLimits(np.array([0.0]), np.array([1.0]), np.array([1.0]), np.array([0.0]))


def test_watchdog_needs_a_positive_staleness_limit() -> None:
    with pytest.raises(RobopolicyError, match="staleness"):
        Watchdog(0.0)
