"""A rollout's parameters and their defaults, written once (PRODUCT.md sections 8, 9 and 11).

``edgectl deploy`` takes its flag defaults from :data:`DEFAULTS`, the hub's API body is these
fields plus ``release`` and ``dry_run``, and the hub stores them as they are here. Waves are
cumulative: ``"25"`` or ``"25%"`` is a share of the selected devices, ``"3n"`` a count of them;
a gate is ``metric<=bound`` or ``metric>=bound`` (``cloud_hub/gates.py`` reads it), judged only once
the wave's updated devices served ``min_requests`` requests.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = ["DEFAULTS", "MAX_DURATION_S", "OnFailure", "RolloutParams"]

MAX_DURATION_S = 7 * 86400

# Sizes only: the hub parses selectors (edgeglm.contracts' label patterns), waves and gates
# and answers a wrong one with a usage error that says how to write it.
_Label = Annotated[str, StringConstraints(max_length=63)]
_Wave = Annotated[str, StringConstraints(max_length=16)]
_Gate = Annotated[str, StringConstraints(max_length=64)]


class OnFailure(StrEnum):
    REVERT = "revert"  # desired state back to what each moved device ran before
    PAUSE = "pause"  # stop where it is; an operator decides


class RolloutParams(BaseModel):
    """How a rollout runs: which devices, in which waves, judged how."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    selector: dict[_Label, _Label] = Field(default_factory=dict, max_length=32)
    waves: tuple[_Wave, ...] = Field(default=("5", "25", "100"), min_length=1, max_length=20)
    soak_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S)
    success_threshold: float = Field(default=1.0, ge=0, le=1)
    max_failure_ratio: float = Field(default=0.05, ge=0, le=1)
    gates: tuple[_Gate, ...] = Field(default=(), max_length=8)
    device_timeout_s: float = Field(default=900.0, gt=0, le=MAX_DURATION_S)
    on_failure: OnFailure = OnFailure.REVERT
    min_samples: int = Field(default=3, ge=1, le=10_000)
    # requests the wave's updated devices served (last heartbeat windows) before a gate is judged
    min_requests: int = Field(default=20, ge=1, le=10_000_000)


DEFAULTS = RolloutParams()
