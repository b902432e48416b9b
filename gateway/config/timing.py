"""`[timing]`: durations."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import StrictModel


class TimingConfig(StrictModel):
    """Durations in seconds."""

    debounce: float = Field(5, ge=0, description="A sensor state must hold this long to count.")
    sensor_offline_after: float = Field(
        900, gt=0, description="No message from a sensor for this long: sensor offline, alert."
    )
    pass_timeout: float = Field(60, gt=0, description="Entry opened and no vehicle passed: session cancelled.")
    reread_window: float = Field(30, gt=0, description="The same plate at the same gate: the same decision.")
    arrival_window: float = Field(
        900, gt=0, description="After passing the gate, a session may still be re-seated by a sensor."
    )
    vacate_grace: float = Field(
        600, gt=0, description="A session's slot vacant this long with no exit: the slot is released."
    )
    hold_ahead: float = Field(
        1800,
        gt=0,
        description="A reserved slot is held (status `reserved`) from start - hold_ahead, or from the end of that"
        " slot's previous reservation when that is later; the reserved vehicle's plate at an entry from then on gets"
        " it (earlier it is a walk-in).",
    )
    no_show_after: float = Field(
        1800,
        gt=0,
        description="A reservation nobody came for is released (`reservation.no_show`) at start + no_show_after,"
        " or at its `end` when that is sooner.",
    )
    idempotency_ttl: float = Field(
        86400, gt=0, description="How long request transactions and camera event ids are remembered."
    )
