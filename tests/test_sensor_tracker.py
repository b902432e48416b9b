"""SensorTracker: ordering by seq / ts / arrival, reboot detection, debounce and flapping."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.observations import SensorObservation
from gateway.core.sensors import CLOCK_RESET_S, SensorTracker, Transition, Verdict


def obs(occupied: bool, *, seq: int | None = None, ts: float | None = None, sensor: str = "s1") -> SensorObservation:
    return SensorObservation(sensor, occupied, ts, seq, None, "json")


# --- ordering -------------------------------------------------------------------------------------------


def test_seq_duplicate_and_out_of_order_are_dropped() -> None:
    tracker = SensorTracker(debounce=0)
    assert tracker.observe(obs(True, seq=100), 0) is Verdict.ACCEPTED
    assert tracker.observe(obs(False, seq=100), 1) is Verdict.DUPLICATE
    assert tracker.observe(obs(False, seq=99), 2) is Verdict.OUT_OF_ORDER
    assert tracker.observe(obs(False, seq=51), 3) is Verdict.OUT_OF_ORDER
    assert tracker.due(3) == [Transition("s1", True, 0)]
    assert tracker.observe(obs(False, seq=101), 4) is Verdict.ACCEPTED
    assert tracker.due(4) == [Transition("s1", False, 4)]


def test_dropped_messages_do_not_refresh_last_seen() -> None:
    tracker = SensorTracker(debounce=5)
    assert tracker.last_seen("s1") is None
    tracker.observe(obs(True, seq=10), 100)
    tracker.observe(obs(True, seq=10), 200)
    tracker.observe(obs(True, seq=9), 300)
    assert tracker.last_seen("s1") == 100
    tracker.observe(obs(True, seq=11), 400)
    assert tracker.last_seen("s1") == 400


def test_reboot_by_low_seq() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.observe(obs(True, seq=500), 0)
    assert tracker.due(0) == [Transition("s1", True, 0)]
    assert tracker.observe(obs(False, seq=0), 1) is Verdict.REBOOT
    assert tracker.due(1) == [Transition("s1", False, 1)]
    # The counter restarts from the reset: the device's next frames are in order again.
    assert tracker.observe(obs(True, seq=1), 2) is Verdict.ACCEPTED
    assert tracker.observe(obs(True, seq=1), 3) is Verdict.DUPLICATE


def test_reboot_by_seq_below_half() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.observe(obs(True, seq=40), 0)
    assert tracker.observe(obs(True, seq=20), 1) is Verdict.OUT_OF_ORDER
    assert tracker.observe(obs(True, seq=19), 2) is Verdict.REBOOT
    assert tracker.observe(obs(True, seq=20), 3) is Verdict.ACCEPTED


def test_seq_wrap_at_32_bits_is_a_reboot() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.observe(obs(True, seq=2**32 - 1), 0)
    assert tracker.observe(obs(True, seq=0), 1) is Verdict.REBOOT


def test_ts_ordering_without_seq() -> None:
    tracker = SensorTracker(debounce=0)
    assert tracker.observe(obs(True, ts=1000.0), 0) is Verdict.ACCEPTED
    assert tracker.observe(obs(False, ts=1000.0), 1) is Verdict.DUPLICATE
    assert tracker.observe(obs(False, ts=999.0), 2) is Verdict.OUT_OF_ORDER
    assert tracker.observe(obs(False, ts=1000.5), 3) is Verdict.ACCEPTED
    # A device clock set back by more than CLOCK_RESET_S is a reset, not a late message forever.
    assert tracker.observe(obs(True, ts=1000.5 - CLOCK_RESET_S - 1), 4) is Verdict.REBOOT
    assert tracker.observe(obs(True, ts=1000.0 - CLOCK_RESET_S), 5) is Verdict.ACCEPTED


def test_seq_wins_over_ts() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.observe(obs(True, seq=5, ts=2000.0), 0)
    assert tracker.observe(obs(False, seq=6, ts=1990.0), 1) is Verdict.ACCEPTED
    assert tracker.observe(obs(False, seq=6, ts=2010.0), 2) is Verdict.DUPLICATE


def test_arrival_order_without_seq_or_ts() -> None:
    tracker = SensorTracker(debounce=0)
    assert tracker.observe(obs(True), 0) is Verdict.ACCEPTED
    assert tracker.observe(obs(True), 0) is Verdict.ACCEPTED
    assert tracker.observe(obs(False), 1) is Verdict.ACCEPTED
    # True held (debounce 0) before False replaced it: both are owed, in order, even though due() ran late.
    assert tracker.due(1) == [Transition("s1", True, 0), Transition("s1", False, 1)]


def test_sensors_are_independent() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.observe(obs(True, seq=50, sensor="a"), 0)
    assert tracker.observe(obs(True, seq=10, sensor="b"), 0) is Verdict.ACCEPTED
    assert sorted(t.sensor_id for t in tracker.due(0)) == ["a", "b"]


# --- debounce -------------------------------------------------------------------------------------------


def test_state_is_due_after_debounce() -> None:
    tracker = SensorTracker(debounce=5)
    assert tracker.next_deadline() is None
    tracker.observe(obs(True), 10)
    assert tracker.next_deadline() == 15
    assert tracker.due(14.999) == []
    assert tracker.due(15) == [Transition("s1", True, 10)]
    assert tracker.due(100) == []  # emitted once
    assert tracker.next_deadline() is None


def test_flapping_emits_nothing_until_a_state_holds() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.seed("s1", False)
    for t, state in [(0, True), (1, False), (2, True), (3, False), (4, True)]:
        tracker.observe(obs(state), t)
        assert tracker.due(t) == []
    assert tracker.next_deadline() == 9
    assert tracker.due(8.9) == []
    assert tracker.due(9) == [Transition("s1", True, 4)]


def test_arriving_lists_the_sensors_debouncing_an_occupancy() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.seed("s1", False)
    tracker.seed("s2", True)
    tracker.observe(obs(True, sensor="s1"), 0)
    tracker.observe(obs(False, sensor="s2"), 0)  # debouncing a vacancy: not arriving
    assert tracker.arriving() == {"s1"}
    tracker.observe(obs(False, sensor="s1"), 1)  # a flap, over
    assert tracker.arriving() == frozenset()
    tracker.observe(obs(True, sensor="s1"), 2)
    assert tracker.arriving() == {"s1"}
    assert tracker.due(7) == [Transition("s2", False, 0), Transition("s1", True, 2)]
    assert tracker.arriving() == frozenset()  # on its way to the store: the store is told by the change itself


def test_flap_back_to_committed_state_cancels_the_change() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.seed("s1", True)
    tracker.observe(obs(False), 0)
    tracker.observe(obs(True), 2)
    assert tracker.next_deadline() is None
    assert tracker.due(100) == []


def test_heartbeat_keeps_the_pending_deadline_and_refreshes_last_seen() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.observe(obs(True), 0)
    tracker.observe(obs(True), 3)
    assert tracker.last_seen("s1") == 3
    assert tracker.next_deadline() == 5
    assert tracker.due(5) == [Transition("s1", True, 0)]
    tracker.observe(obs(True), 50)  # heartbeat of the confirmed state
    assert tracker.last_seen("s1") == 50
    assert tracker.next_deadline() is None
    assert tracker.due(1000) == []


def test_seed_suppresses_the_known_state() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.seed("s1", True)
    tracker.observe(obs(True), 0)
    assert tracker.due(100) == []
    assert tracker.last_seen("s1") == 0


def test_seed_after_observation_clears_a_now_matching_pending_state() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.observe(obs(True), 0)
    tracker.seed("s1", True)
    assert tracker.next_deadline() is None
    assert tracker.due(10) == []


def test_unknown_seed_still_emits_the_first_state() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.seed("s1", None)
    tracker.observe(obs(False), 0)
    assert tracker.due(5) == [Transition("s1", False, 0)]


def test_zero_debounce_is_due_immediately() -> None:
    tracker = SensorTracker(debounce=0)
    tracker.seed("s1", False)
    tracker.observe(obs(True), 7)
    assert tracker.next_deadline() == 7
    assert tracker.due(7) == [Transition("s1", True, 7)]


def test_due_returns_deadlines_in_order_across_sensors() -> None:
    tracker = SensorTracker(debounce=5)
    tracker.observe(obs(True, sensor="late"), 3)
    tracker.observe(obs(True, sensor="early"), 1)
    assert tracker.next_deadline() == 6
    assert [t.sensor_id for t in tracker.due(10)] == ["early", "late"]


# --- property -------------------------------------------------------------------------------------------

SENSORS = ["a", "b", "c"]


@dataclass(frozen=True)
class Step:
    advance: float
    sensor: str | None  # None: only the clock moves
    occupied: bool
    seq: int | None
    ts: float | None


steps = st.builds(
    Step,
    advance=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.9, 5.0, 7.0, 30.0]),
    sensor=st.sampled_from([*SENSORS, None]),
    occupied=st.booleans(),
    seq=st.none() | st.integers(min_value=0, max_value=40),
    ts=st.none() | st.floats(min_value=0, max_value=2000).map(round),
)


@settings(max_examples=400, deadline=None)
@given(
    debounce=st.sampled_from([0.0, 1.0, 5.0]),
    seeds=st.fixed_dictionaries({s: st.sampled_from([None, True, False]) for s in SENSORS}),
    script=st.lists(steps, max_size=60),
)
def test_emitted_transitions_alternate_and_held_for_debounce(
    debounce: float, seeds: dict[str, bool | None], script: list[Step]
) -> None:
    tracker = SensorTracker(debounce=debounce)
    for sensor, state in seeds.items():
        tracker.seed(sensor, state)
    accepted: dict[str, list[tuple[float, bool]]] = {s: [] for s in SENSORS}
    last_emitted = dict(seeds)
    now = 0.0

    def collect() -> None:
        deadline = tracker.next_deadline()
        emitted = tracker.due(now)
        assert (deadline is not None and deadline <= now) or not emitted
        assert tracker.arriving() == {s for s, state in tracker._sensors.items() if state.pending is True}
        for transition in emitted:
            log = accepted[transition.sensor_id]
            assert transition.occupied != last_emitted[transition.sensor_id]
            last_emitted[transition.sensor_id] = transition.occupied
            # `at` opens a run of accepted messages in this state (the latest such run), and the run lasted
            # `debounce`: until the next message in another state, or until now when it is still going on.
            starts = [
                i
                for i, (t, state) in enumerate(log)
                if state == transition.occupied and (i == 0 or log[i - 1][1] != state) and t == transition.at
            ]
            assert starts, (transition, log)
            start = starts[-1]
            end = next((t for t, state in log[start:] if state != transition.occupied), now)
            assert transition.at + debounce <= end  # the form the tracker computes; float-exact

    for step in script:
        now += step.advance
        if step.sensor is not None:
            observation = SensorObservation(step.sensor, step.occupied, step.ts, step.seq, None, "json")
            verdict = tracker.observe(observation, now)
            if verdict in (Verdict.ACCEPTED, Verdict.REBOOT):
                accepted[step.sensor].append((now, step.occupied))
                assert tracker.last_seen(step.sensor) == now
        collect()

    # Eventually the emitted state converges on the last accepted one.
    now += debounce + 1
    collect()
    assert tracker.next_deadline() is None
    for sensor, log in accepted.items():
        if log:
            assert last_emitted[sensor] == log[-1][1]


def test_a_state_that_held_is_owed_even_when_due_runs_late() -> None:
    # A busy event loop may call due() long after a deadline: what held for `debounce` still counts,
    # what did not is still a flap.
    tracker = SensorTracker(debounce=5)
    tracker.observe(obs(True), 0)
    tracker.observe(obs(False), 6)  # True held 6 s before this
    tracker.observe(obs(True), 8)  # False held 2 s: a flap
    assert tracker.next_deadline() == 5
    assert tracker.due(8) == [Transition("s1", True, 0)]
    assert tracker.due(100) == []


# --- commit outcome: nothing counts as committed before the writer says so --------------------------------


def test_a_transition_is_committed_only_when_reported() -> None:
    tracker = SensorTracker(debounce=1)
    tracker.observe(obs(True), 0)
    [t] = tracker.due(1)
    tracker.observe(obs(True), 2)  # a heartbeat of the state on its way: nothing new
    assert tracker.due(10) == []
    tracker.failed([t], 10)  # the commit failed: owed again, after a pause
    assert tracker.due(10) == [] and tracker.next_deadline() == 11
    [again] = tracker.due(11)
    assert again == t
    tracker.committed([again])
    tracker.observe(obs(True), 12)
    assert tracker.due(20) == [] and tracker.next_deadline() is None


def test_a_failed_transition_that_the_sensor_undid_is_owed_no_more() -> None:
    tracker = SensorTracker(debounce=1)
    tracker.seed("s1", False)
    tracker.observe(obs(True), 0)
    [t] = tracker.due(1)
    tracker.observe(obs(False), 2)  # back to the committed state while the commit is on its way
    tracker.failed([t], 3)
    assert tracker.due(10) == [] and tracker.next_deadline() is None
    tracker.observe(obs(True), 11)  # and a real change later is still seen
    assert tracker.due(12) == [Transition("s1", True, 11)]


def test_a_failed_transition_superseded_by_a_newer_one_is_dropped() -> None:
    tracker = SensorTracker(debounce=1)
    tracker.seed("s1", False)
    tracker.observe(obs(True), 0)
    [first] = tracker.due(1)
    tracker.observe(obs(False), 2)
    [second] = tracker.due(3)
    tracker.failed([first], 4)
    tracker.committed([second])
    assert tracker.due(10) == [] and tracker.next_deadline() is None
    tracker.observe(obs(False), 11)  # vacant is committed: a heartbeat changes nothing
    assert tracker.due(20) == []
