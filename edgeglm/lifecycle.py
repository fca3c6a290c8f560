"""The hub's rollout lifecycle as data: the states of a rollout, a wave and a device's deployment,
and the tables of the moves between them (PRODUCT.md section 8; ``cloud_hub/controller.py`` and
``cloud_hub/rollouts.py`` drive them, the CLI and the dashboard read them).

    rollout   running ─pause─> paused ─resume─> running
              running ─complete─> completed     every wave passed
              running ─revert─> reverted        a wave failed, on_failure = revert
              running ─hold─> paused            a wave failed (on_failure = pause) or stayed inconclusive
              running ─give_up─> failed         its next step cannot be built (the reason is kept)
              running | paused ─abort─> aborted
              any ─rollback─> rolled_back       edgectl rollback MODEL --fleet

    wave      pending ─start─> deploying ─settle─> soaking ─pass─> passed
                                   └─fail─> failed <─fail─┘

    device    waiting ─> pending ─> succeeded | failed | timed_out;  waiting ─> skipped;
              any moved ─> reverted

A move that is not in its table is a bug, refused with :class:`LifecycleError` (the controller
then ends that rollout ``failed`` with the reason; the others go on).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "ACTIVE_ROLLOUT",
    "FAILED_DEPLOYMENT",
    "FINAL_ROLLOUT",
    "ROLLOUT_TRANSITIONS",
    "WAVE_TRANSITIONS",
    "DeploymentState",
    "LifecycleError",
    "RolloutEvent",
    "RolloutState",
    "WaveEvent",
    "WaveState",
    "next_rollout_state",
    "next_wave_state",
    "rollout_sources",
]


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    REVERTED = "reverted"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class RolloutEvent(StrEnum):
    PAUSE = "pause"  # the operator
    RESUME = "resume"
    ABORT = "abort"
    COMPLETE = "complete"  # the controller: every wave passed
    REVERT = "revert"  # a wave failed and on_failure = revert
    HOLD = "hold"  # a wave failed and on_failure = pause, or it stayed inconclusive
    GIVE_UP = "give_up"  # the controller cannot build the rollout's next step
    ROLLBACK = "rollback"  # the operator sends the moved devices back


class WaveState(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    SOAKING = "soaking"
    PASSED = "passed"
    FAILED = "failed"


class WaveEvent(StrEnum):
    START = "start"  # baseline captured, desired state sent to the wave's devices
    SETTLE = "settle"  # every device settled within the thresholds
    PASS = "pass"  # the soak ended and the gates passed
    FAIL = "fail"  # too many failures, a gate breach


class DeploymentState(StrEnum):
    WAITING = "waiting"  # its wave has not started
    PENDING = "pending"  # desired state sent, no result yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # the rollout ended before its wave
    REVERTED = "reverted"  # sent back to what it ran before


ACTIVE_ROLLOUT = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
FINAL_ROLLOUT = frozenset(RolloutState) - ACTIVE_ROLLOUT
FAILED_DEPLOYMENT = frozenset({DeploymentState.FAILED, DeploymentState.TIMED_OUT})

_R, _E = RolloutState, RolloutEvent
ROLLOUT_TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], RolloutState] = MappingProxyType(
    {
        (_R.RUNNING, _E.PAUSE): _R.PAUSED,
        (_R.PAUSED, _E.RESUME): _R.RUNNING,
        (_R.RUNNING, _E.ABORT): _R.ABORTED,
        (_R.PAUSED, _E.ABORT): _R.ABORTED,
        (_R.RUNNING, _E.COMPLETE): _R.COMPLETED,
        (_R.RUNNING, _E.REVERT): _R.REVERTED,
        (_R.RUNNING, _E.HOLD): _R.PAUSED,
        (_R.RUNNING, _E.GIVE_UP): _R.FAILED,
        **{(state, _E.ROLLBACK): _R.ROLLED_BACK for state in RolloutState},
    }
)

_W, _V = WaveState, WaveEvent
WAVE_TRANSITIONS: Mapping[tuple[WaveState, WaveEvent], WaveState] = MappingProxyType(
    {
        (_W.PENDING, _V.START): _W.DEPLOYING,
        (_W.DEPLOYING, _V.SETTLE): _W.SOAKING,
        (_W.DEPLOYING, _V.FAIL): _W.FAILED,
        (_W.SOAKING, _V.PASS): _W.PASSED,
        (_W.SOAKING, _V.FAIL): _W.FAILED,
    }
)


class LifecycleError(ValueError):
    """A move its table does not allow."""


def rollout_sources(event: RolloutEvent) -> list[RolloutState]:
    """The states a rollout must be in for ``event``, in declaration order."""
    return [state for state in RolloutState if (state, event) in ROLLOUT_TRANSITIONS]


def next_rollout_state(state: str, event: RolloutEvent) -> RolloutState:
    """Where ``event`` takes a rollout in ``state``; :class:`LifecycleError` if nowhere."""
    try:
        return ROLLOUT_TRANSITIONS[(RolloutState(state), event)]
    except (KeyError, ValueError):
        raise LifecycleError(f"a {state} rollout cannot {event}") from None


def next_wave_state(state: str, event: WaveEvent) -> WaveState:
    """Where ``event`` takes a wave in ``state``; :class:`LifecycleError` if nowhere."""
    try:
        return WAVE_TRANSITIONS[(WaveState(state), event)]
    except (KeyError, ValueError):
        raise LifecycleError(f"a {state} wave cannot {event}") from None
