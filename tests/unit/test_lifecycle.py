"""The rollout lifecycle tables: every state reachable, the final ones final, wrong moves refused."""

from __future__ import annotations

import pytest

from edgeglm.lifecycle import (
    ACTIVE_ROLLOUT,
    FINAL_ROLLOUT,
    ROLLOUT_TRANSITIONS,
    WAVE_TRANSITIONS,
    LifecycleError,
    RolloutEvent,
    RolloutState,
    WaveEvent,
    WaveState,
    next_rollout_state,
    next_wave_state,
    rollout_sources,
)


def _reachable(table: dict, start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for (state, _event), to in table.items():
            if state == here and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_every_state_is_reachable_from_the_start() -> None:
    assert _reachable(dict(ROLLOUT_TRANSITIONS), RolloutState.RUNNING) == set(RolloutState)
    assert _reachable(dict(WAVE_TRANSITIONS), WaveState.PENDING) == set(WaveState)


def test_final_states_leave_only_by_an_operators_rollback() -> None:
    for (state, event), _to in ROLLOUT_TRANSITIONS.items():
        if state in FINAL_ROLLOUT:
            assert event is RolloutEvent.ROLLBACK
    for state in (WaveState.PASSED, WaveState.FAILED):
        assert not [k for k in WAVE_TRANSITIONS if k[0] == state]
    assert set(RolloutState) == ACTIVE_ROLLOUT | FINAL_ROLLOUT


def test_a_move_its_table_lacks_is_refused_by_name() -> None:
    assert next_rollout_state("running", RolloutEvent.GIVE_UP) is RolloutState.FAILED
    assert next_wave_state("deploying", WaveEvent.SETTLE) is WaveState.SOAKING
    with pytest.raises(LifecycleError, match="a completed rollout cannot resume"):
        next_rollout_state("completed", RolloutEvent.RESUME)
    with pytest.raises(LifecycleError, match="a passed wave cannot fail"):
        next_wave_state("passed", WaveEvent.FAIL)
    with pytest.raises(LifecycleError, match="a bogus rollout"):
        next_rollout_state("bogus", RolloutEvent.PAUSE)
    assert rollout_sources(RolloutEvent.ABORT) == [RolloutState.RUNNING, RolloutState.PAUSED]
