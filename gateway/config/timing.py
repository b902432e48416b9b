"""`[timing]`: durations."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import StrictModel


class TimingConfig(StrictModel):
    """Durations in seconds."""

    debounce: float = Field(5, ge=0, description="A sensor state must hold this long to count.")
    sensor_offline_after: float = Field(
        900,
        gt=0,
        description="No message from a sensor for this long: sensor `offline`, alert; its slot stays allocatable,"
        " last. A slot group may set its own `offline_after`.",
    )
    sensor_seen_flush: float = Field(
        60,
        gt=0,
        description="Heartbeats never write to the store: a sensor's offline deadline is kept in memory and written"
        " in one batch every this many seconds, only when it moved by more than 3 x this (so at most once per"
        " 3 x this per sensor). A clean stop writes the exact deadlines; after a crash an offline alert comes at"
        " most 5 x this late, never early.",
    )
    pass_timeout: float = Field(60, gt=0, description="Entry opened and no vehicle passed: session cancelled.")
    reread_window: float = Field(30, gt=0, description="The same plate at the same gate: the same decision.")
    arrival_window: float = Field(
        900,
        gt=0,
        description="For this long after `session.confirmed` a session is on its way to its slot: an occupied sensor"
        " on a free slot of its lot re-seats it there (`session.moved`) instead of raising"
        " `slot.unregistered_occupancy`, until its own slot's sensor sees it.",
    )
    drive_time: float = Field(
        180,
        gt=0,
        description="(extension) Most cars reach a slot within this long after `session.confirmed`. A car found in"
        " a slot without a session is matched first to the sessions on their way for less than this (the likelier"
        " zone first, weighing each session by how close it is to this; then the oldest), then to those on their"
        " way longer (their cars are probably parked where no sensor sees them).",
    )
    vacate_grace: float = Field(
        600,
        gt=0,
        description="A session's slot vacant this long with no exit (counted from the vacant report, or from"
        " `session.confirmed` when the car never arrived): alert, the session runs on without a slot"
        " (`session.moved` to null) and the slot is available again. Cancelled by an occupied report.",
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
