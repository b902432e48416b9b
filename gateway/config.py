"""The configuration file (contract §2): pydantic models, loading, and error reporting by field path."""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SYSTEM_CONFIG_PATH = Path("/etc/parking-gateway/gateway.toml")
MAX_SLOTS_PER_GROUP = 100_000
STANDARD_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

_ID_CHARS = r"[A-Za-z0-9_.:-]{1,64}"
_SLOT_ID = re.compile(rf"^{_ID_CHARS}$")
_DEVICE_ID = r"^[A-Za-z0-9_.:@-]{1,64}$"
_TYPE_WORD = r"^[A-Za-z0-9_-]{1,32}$"
# A topic prefix: one or more non-empty levels, no wildcards.
_TOPIC_ROOT = r"^[^/+#\x00]+(/[^/+#\x00]+)*$"
# The numeric suffix of a range end; the lazy prefix leaves every trailing digit to the number.
_RANGE_END = re.compile(r"^(.*?)([0-9]+)$")

Loc = tuple[str | int, ...]

TypeWord = Annotated[str, Field(pattern=_TYPE_WORD)]
Plate = Annotated[str, Field(min_length=1, max_length=32)]


class _Problems(ValueError):
    """Validation failures with paths relative to the validated object; expanded by the error formatter."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{_format_loc(loc) or '.'}: {msg}" for loc, msg in problems))
        self.problems = problems


class ConfigError(Exception):
    """Everything wrong with a configuration, one line per problem, each named by its field path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class _Model(BaseModel):
    # strict: TOML already has types, so "yes" for a boolean or "80" for a port is a mistake, not a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_secret_source(password: str | None, password_file: str | None) -> list[tuple[Loc, str]]:
    if password is not None and password_file is not None:
        return [(("password_file",), "set either password or password_file, not both")]
    return []


class GatewaySection(_Model):
    """This gateway: its identity, where it keeps its store, and where its own topics live."""

    id: str = Field(pattern=r"^[a-z0-9-]{1,32}$", description="Gateway id, `[a-z0-9-]{1,32}`; part of every topic.")
    state_dir: str = Field(
        "var",
        min_length=1,
        description="Directory of the SQLite store `gateway.db` and the plate key, relative to the working "
        "directory; `$STATE_DIRECTORY` (set by systemd) wins when set; created if missing.",
    )
    topic_root: str = Field(
        "parking",
        pattern=_TOPIC_ROOT,
        description="The gateway's own topics are `<topic_root>/<id>/...`; one or more levels, no wildcards.",
    )


class TLSConfig(_Model):
    """TLS for an MQTT connection: CA to verify the peer, and an optional client certificate."""

    ca: str | None = Field(None, min_length=1, description="CA certificate file (PEM); unset: the system CAs.")
    cert: str | None = Field(
        None,
        min_length=1,
        description="Certificate file (PEM): the client certificate, or for the embedded broker its "
        "listener's certificate; needs `key`.",
    )
    key: str | None = Field(None, min_length=1, description="Private key file (PEM) of `cert`; needs `cert`.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Self:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise _Problems([((missing,), "cert and key go together: set both or neither")])
        return self


class BrokerConfig(_Model):
    """The local, device-side MQTT broker: the bundled one in-process, or an external one."""

    embedded: bool = Field(True, description="Start the bundled broker (amqtt, MQTT 3.1.1) in-process.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the embedded broker binds to, or the external broker to connect to.",
    )
    port: int = Field(1883, ge=1, le=65535, description="TCP port, 1..65535.")
    username: str | None = Field(None, min_length=1, description="User name the gateway connects with.")
    password: str | None = Field(None, description="Password the gateway connects with.")
    password_file: str | None = Field(
        None, min_length=1, description="File whose first line is the password; instead of `password`."
    )
    tls: TLSConfig | None = Field(None, description="TLS for the broker connection; unset: plain TCP.")
    acl_file: str | None = Field(
        None,
        min_length=1,
        description="Embedded broker only: a Mosquitto-style ACL file (`user`, `topic`, `pattern` with `%u`); "
        "unset: the gateway's account may do everything, every other account publish to its own ingress topics.",
    )
    users_file: str | None = Field(
        None,
        min_length=1,
        description="Embedded broker only: `user:hash` lines with Argon2 hashes, written by "
        "`parking-gateway passwd FILE USER`; required unless `allow_anonymous`.",
    )
    mqtt_version: Literal["3.1.1", "5"] = Field(
        "5",
        description="External broker only: the protocol the gateway speaks to it. 5 lets requests carry a "
        "response topic and correlation data; 3.1.1 costs less CPU per message. The bundled broker is 3.1.1.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Embedded broker only: accept clients without credentials (fine for a demo on "
        "127.0.0.1, not for a site).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = _check_secret_source(self.password, self.password_file)
        if self.embedded:
            if not self.allow_anonymous and self.users_file is None:
                problems.append((("users_file",), "required for the embedded broker unless allow_anonymous = true"))
        else:
            for name in ("acl_file", "users_file"):
                if getattr(self, name) is not None:
                    problems.append(((name,), "only applies to the embedded broker (embedded = true)"))
        if problems:
            raise _Problems(problems)
        return self


class UpstreamConfig(_Model):
    """The upstream broker that receives the event outbox and may send requests; absent: no upstream sync."""

    host: str = Field(min_length=1, description="Upstream broker host name or address.")
    port: int = Field(8883, ge=1, le=65535, description="TCP port, 1..65535.")
    tls: TLSConfig | None = Field(
        None, description="TLS (CA, client certificate); unset: plain TCP, with a warning in the log."
    )
    username: str | None = Field(None, min_length=1, description="User name.")
    password: str | None = Field(None, description="Password.")
    password_file: str | None = Field(
        None, min_length=1, description="File whose first line is the password; instead of `password`."
    )
    topic_root: str | None = Field(
        None, pattern=_TOPIC_ROOT, description="Topic root upstream; unset: `[gateway].topic_root`."
    )
    outbox_max_bytes: int = Field(
        268_435_456,
        ge=1_048_576,
        description="Bound of the outbox on disk while upstream is unreachable (at least 1 MiB); past it "
        "superseded state events are compacted.",
    )
    keepalive: int = Field(30, ge=1, le=65535, description="MQTT keepalive in seconds.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = _check_secret_source(self.password, self.password_file)
        if problems:
            raise _Problems(problems)
        return self


def _filter_problem(topic_filter: str) -> str | None:
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "NUL character in topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' is only allowed as the whole last level: {topic_filter!r}"
        if "+" in level and level != "+":
            return f"'+' must be a whole level: {topic_filter!r}"
    if "+" not in levels:
        return f"needs a '+' level (it matches the device id): {topic_filter!r}"
    return None


IngressKind = Literal["sensors", "tts", "cameras", "platerecognizer"]


class IngressConfig(_Model):
    """Device topics on the local broker (MQTT filters); the device id is the level matched by the first `+`
    (for `tts`, the last: its first `+` is the application)."""

    sensors: list[str] = Field(["sensors/+/state"], description="JSON occupancy sensors.")
    tts: list[str] = Field(["v3/+/devices/+/up"], description="LoRaWAN sensors via The Things Stack v3 uplinks.")
    cameras: list[str] = Field(["cameras/+/reads"], description="JSON plate cameras.")
    platerecognizer: list[str] = Field(["cameras/+/platerecognizer"], description="Plate Recognizer Stream webhooks.")

    @field_validator("sensors", "tts", "cameras", "platerecognizer")
    @classmethod
    def _valid_filters(cls, value: list[str]) -> list[str]:
        problems: list[tuple[Loc, str]] = []
        for i, topic_filter in enumerate(value):
            problem = _filter_problem(topic_filter)
            if problem is not None:
                problems.append(((i,), problem))
        if problems:
            raise _Problems(problems)
        return value

    def by_kind(self) -> tuple[tuple[IngressKind, list[str]], ...]:
        return (
            ("sensors", self.sensors),
            ("tts", self.tts),
            ("cameras", self.cameras),
            ("platerecognizer", self.platerecognizer),
        )


class TimingConfig(_Model):
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
    hold_ahead: float = Field(1800, gt=0, description="A reserved slot is held from start - hold_ahead.")
    no_show_after: float = Field(
        1800, gt=0, description="A reservation is released when nobody came by start + no_show_after."
    )
    idempotency_ttl: float = Field(
        86400, gt=0, description="How long request transactions and camera event ids are remembered."
    )


class PolicyConfig(_Model):
    """Decisions at the gates."""

    anti_passback: Literal["hard", "soft"] = Field(
        "hard",
        description="`hard`: a vehicle with an active session is refused (`already_active`); `soft`: the "
        "existing session is returned and an alert raised.",
    )
    exit_unpaid: Literal["deny", "bill_later"] = Field(
        "deny",
        description="`deny`: `payment_required`, the barrier stays closed; `bill_later`: open and publish "
        "`payment.requested`.",
    )


class Permit(_Model):
    """A vehicle allowed to use restricted slot types."""

    vehicle: Plate = Field(description="Plate (or ticket) of the vehicle.")
    types: list[TypeWord] = Field(min_length=1, description="Slot types it may use; each must exist in a lot.")


class AccessConfig(_Model):
    """Local access lists; upstream can replace them later."""

    deny: list[Plate] = Field([], description="Plates refused at entry (`entry.denied`, reason `denied`).")
    permits: list[Permit] = Field([], description="Vehicles allowed to use restricted types.")
    restricted_types: list[TypeWord] = Field(
        ["accessible", "ev"], description="Slot types given only to permit holders or an explicit request."
    )


class PrivacyConfig(_Model):
    """What leaves the gateway, and for how long plates are kept."""

    plate_key_file: str = Field(
        "plate.key",
        min_length=1,
        description="HMAC key for vehicle tokens, relative to the state directory; created (0600) on first "
        "start if missing.",
    )
    publish_plates: bool = Field(False, description="Events carry plates instead of vehicle tokens.")
    retention_days: int = Field(30, ge=1, description="Ended sessions: the plate is replaced by its token after this.")


class StoreConfig(_Model):
    """The SQLite store (extension of the contract)."""

    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite `synchronous`: `FULL` survives power loss; `NORMAL` (WAL) may lose the last "
        "commits on power loss, never corrupts.",
    )
    group_commit_max: int = Field(256, ge=1, le=10000, description="Most commands applied in one transaction.")
    rejections_kept: int = Field(1000, ge=0, description="How many rejected device messages the store keeps.")


def _range_count(spec: str) -> tuple[str, int, int, int | None]:
    """(prefix, first, last, width or None when unpadded) of `"A-001..A-100"`; ValueError when it is wrong."""
    start, _, end = spec.partition("..")
    m_start, m_end = _RANGE_END.match(start), _RANGE_END.match(end)
    if m_start is None or m_end is None:
        raise ValueError(f"range ends must end in digits: {spec!r}")
    (prefix, first_digits), (end_prefix, last_digits) = m_start.groups(), m_end.groups()
    if prefix != end_prefix:
        raise ValueError(f"range ends have different prefixes {prefix!r} and {end_prefix!r}: {spec!r}")
    first, last = int(first_digits), int(last_digits)
    width: int | None
    if len(first_digits) == len(last_digits):
        width = len(first_digits)
    elif str(first) == first_digits and str(last) == last_digits:
        width = None
    else:
        raise ValueError(
            f"range ends have different digit widths ({len(first_digits)} and {len(last_digits)}); "
            f"a zero-padded range needs the same width on both ends: {spec!r}"
        )
    if last < first:
        raise ValueError(f"range end before start: {spec!r}")
    if last - first + 1 > MAX_SLOTS_PER_GROUP:
        raise ValueError(f"range of {last - first + 1} slots is too large (at most {MAX_SLOTS_PER_GROUP} per group)")
    return prefix, first, last, width


def _slot_id_problem(slot_id: str) -> str | None:
    if ".." in slot_id or not _SLOT_ID.match(slot_id):
        return f"invalid slot id {slot_id!r}: 1 to 64 of A-Z a-z 0-9 _ . : - (no '..')"
    return None


def expand_slot_ids(ids: str | list[str]) -> list[str]:
    """The slot ids of a group: a range `"L1-001..L1-100"`, a single id, or a list of ids.

    A range's ends share a prefix and end in digits; with equal digit widths the zero padding is kept,
    otherwise both ends must be unpadded (`P1..P20`). Raises _Problems (paths relative to `ids`).
    """
    if isinstance(ids, list):
        if not ids:
            raise _Problems([((), "empty list of slot ids")])
        problems: list[tuple[Loc, str]] = [
            ((i,), p) for i, slot_id in enumerate(ids) if (p := _slot_id_problem(slot_id)) is not None
        ]
        if problems:
            raise _Problems(problems)
        return list(ids)
    if ".." not in ids:
        problem = _slot_id_problem(ids)
        if problem is not None:
            raise _Problems([((), problem)])
        return [ids]
    try:
        prefix, first, last, width = _range_count(ids)
    except ValueError as exc:
        raise _Problems([((), str(exc))]) from None
    expanded = [f"{prefix}{n}" if width is None else f"{prefix}{n:0{width}d}" for n in range(first, last + 1)]
    problem = _slot_id_problem(expanded[-1]) or _slot_id_problem(expanded[0])
    if problem is not None:
        raise _Problems([((), problem)])
    return expanded


class SlotGroup(_Model):
    """Slots of one type in a zone: a range, a single id, or a list of ids."""

    ids: str | list[str] = Field(
        description='`"L1-001..L1-100"` (inclusive range, zero padding kept), `"L1-113"`, or '
        '`["L1-111", "L1-112"]`. Slot ids: 1-64 of `A-Z a-z 0-9 _ . : -`; at most 100000 per group.'
    )
    type: TypeWord = Field("standard", description="Slot type, a free word: `standard`, `ev`, `accessible`, ...")
    sensor: str | None = Field(
        None,
        pattern=_DEVICE_ID,
        description="Sensor id of the slot, only for a one-slot group; default: each slot's own id.",
    )
    offline_after: float | None = Field(
        None, gt=0, description="This group's `sensor_offline_after` (e.g. a LoRaWAN daily heartbeat)."
    )

    _slot_ids: tuple[str, ...] = PrivateAttr(())

    @field_validator("ids", mode="before")
    @classmethod
    def _ids_shape(cls, value: object) -> object:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("expected a string (an id or a range) or a list of strings")

    @field_validator("ids")
    @classmethod
    def _ids_expand(cls, value: str | list[str]) -> str | list[str]:
        expand_slot_ids(value)
        return value

    @model_validator(mode="after")
    def _single_slot_sensor(self) -> Self:
        self._slot_ids = tuple(expand_slot_ids(self.ids))
        if self.sensor is not None and len(self._slot_ids) != 1:
            raise _Problems([(("sensor",), f"only allowed for a single slot, this group has {len(self._slot_ids)}")])
        return self

    @property
    def slot_ids(self) -> tuple[str, ...]:
        """The expanded slot ids, in order."""
        return self._slot_ids


class ZoneConfig(_Model):
    """A group of slots: a level, an area."""

    id: str = Field(pattern=rf"^{_ID_CHARS}$", description="Zone id, unique in its lot.")
    name: str | None = Field(None, description="Display name.")
    slots: list[SlotGroup] = Field(min_length=1, description="The zone's slots, in fill order.")


class LotConfig(_Model):
    """A facility served by this gateway."""

    id: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="Lot id, `[a-z0-9_-]{1,32}`; appears in topics.")
    name: str = Field("", description="Display name.")
    zones: list[ZoneConfig] = Field(min_length=1, description="The lot's zones.")


class SerialConfig(_Model):
    """The barrier controller's serial line (GCP/1)."""

    port: str = Field(min_length=1, description="Serial device, e.g. `/dev/ttyUSB0`.")
    baudrate: int = Field(9600, description=f"One of {', '.join(map(str, STANDARD_BAUDRATES))}; 8N1.")
    address: int = Field(1, ge=0, le=255, description="Controller address on the line, 0..255.")

    @field_validator("baudrate")
    @classmethod
    def _standard_rate(cls, value: int) -> int:
        if value not in STANDARD_BAUDRATES:
            raise ValueError(f"not a standard rate ({', '.join(map(str, STANDARD_BAUDRATES))}): {value}")
        return value


class GateConfig(_Model):
    """An entry or exit lane: a barrier controller and an optional plate camera."""

    id: str = Field(pattern=rf"^{_ID_CHARS}$", description="Gate id; appears in topics.")
    lot: str = Field(description="The lot this gate serves.")
    direction: Literal["entry", "exit"] = Field(description="`entry` or `exit`.")
    camera: str | None = Field(None, pattern=_DEVICE_ID, description="Plate camera id; unset: no camera.")
    serial: SerialConfig | None = Field(None, description="Barrier controller; unset: no barrier.")


class OccupancyMultiplier(_Model):
    """From an occupancy fraction on, the hourly rate is multiplied by a factor."""

    from_: float = Field(alias="from", ge=0, le=1, description="Occupancy fraction 0..1 from which it applies.")
    factor: float = Field(gt=0, description="Multiplier of `per_hour`.")


class TariffConfig(_Model):
    """A lot's tariff; money is integer minor units (cents), never floats. A lot without one is free."""

    lot: str = Field(description="The lot this tariff applies to; one tariff per lot.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. `EUR`.")
    free_minutes: int = Field(0, ge=0, description="Minutes free of charge (the tariff rules say how they count).")
    per_hour: int = Field(ge=0, description="Price per hour, minor units.")
    daily_cap: int | None = Field(None, ge=0, description="Cap per day, minor units; unset: no cap.")
    exit_grace_minutes: int = Field(10, ge=0, description="Time to leave after payment.")
    occupancy_multipliers: list[OccupancyMultiplier] = Field(
        [],
        description="Surge pricing, by strictly increasing `from`; below the first one the factor is 1.",
    )

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        for i in range(1, len(self.occupancy_multipliers)):
            if self.occupancy_multipliers[i].from_ <= self.occupancy_multipliers[i - 1].from_:
                problems.append((("occupancy_multipliers", i, "from"), "must be greater than the previous 'from'"))
        if problems:
            raise _Problems(problems)
        return self


@dataclass(frozen=True, slots=True)
class SlotSpec:
    """One configured slot, flattened."""

    id: str
    lot: str
    zone: str
    type: str
    sensor: str
    offline_after: float | None
    fill_order: int


def _listing(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5])
    return shown if len(ids) <= 5 else f"{shown} and {len(ids) - 5} more"


class GatewayConfig(_Model):
    """The whole configuration file."""

    gateway: GatewaySection = Field(description="This gateway.")
    # Omitted tables are validated from {} rather than built, so that an invalid default (the default
    # broker is embedded and closed: it needs a users_file) is reported by path like any other error.
    broker: BrokerConfig = Field(default_factory=dict, validate_default=True, description="The local broker.")
    upstream: UpstreamConfig | None = Field(None, description="Upstream sync; absent: none.")
    ingress: IngressConfig = Field(default_factory=dict, validate_default=True, description="Device topics.")
    timing: TimingConfig = Field(default_factory=dict, validate_default=True, description="Durations.")
    policy: PolicyConfig = Field(default_factory=dict, validate_default=True, description="Gate decisions.")
    access: AccessConfig = Field(default_factory=dict, validate_default=True, description="Access lists.")
    privacy: PrivacyConfig = Field(default_factory=dict, validate_default=True, description="Privacy.")
    store: StoreConfig = Field(default_factory=dict, validate_default=True, description="The SQLite store.")
    lots: list[LotConfig] = Field(min_length=1, description="The lots served.")
    gates: list[GateConfig] = Field([], description="Entry and exit lanes.")
    tariffs: list[TariffConfig] = Field([], description="Tariffs, at most one per lot.")

    _slot_specs: tuple[SlotSpec, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        specs = self._check_lots(problems)
        self._check_gates(problems)
        self._check_tariffs(problems)
        slot_types = {spec.type for spec in specs}
        for p, permit in enumerate(self.access.permits):
            for t, type_ in enumerate(permit.types):
                if type_ not in slot_types:
                    problems.append((("access", "permits", p, "types", t), f"no slot has type {type_!r}"))
        if problems:
            raise _Problems(problems)
        self._slot_specs = tuple(specs)
        return self

    def _check_lots(self, problems: list[tuple[Loc, str]]) -> list[SlotSpec]:
        specs: list[SlotSpec] = []
        lot_places: dict[str, int] = {}
        slot_places: dict[str, Loc] = {}
        # sensor id -> (where, set explicitly); two defaulted sensors collide only when slot ids do.
        sensor_places: dict[str, tuple[Loc, bool]] = {}
        for li, lot in enumerate(self.lots):
            if lot.id in lot_places:
                problems.append((("lots", li, "id"), f"duplicate lot id {lot.id!r} (also lots[{lot_places[lot.id]}])"))
            lot_places.setdefault(lot.id, li)
            zone_places: dict[str, int] = {}
            fill_order = 0
            for zi, zone in enumerate(lot.zones):
                if zone.id in zone_places:
                    problems.append(
                        (
                            ("lots", li, "zones", zi, "id"),
                            f"duplicate zone id {zone.id!r} (also lots[{li}].zones[{zone_places[zone.id]}])",
                        )
                    )
                zone_places.setdefault(zone.id, zi)
                for gi, group in enumerate(zone.slots):
                    here: Loc = ("lots", li, "zones", zi, "slots", gi)
                    clashes: dict[Loc, list[str]] = {}
                    for slot_id in group.slot_ids:
                        if slot_id in slot_places:
                            clashes.setdefault(slot_places[slot_id], []).append(slot_id)
                        else:
                            slot_places[slot_id] = here
                        sensor = group.sensor or slot_id
                        explicit = group.sensor is not None
                        sensor_loc = (*here, "sensor" if explicit else "ids")
                        if sensor in sensor_places:
                            other, other_explicit = sensor_places[sensor]
                            if explicit or other_explicit:
                                problems.append(
                                    (sensor_loc, f"duplicate sensor id {sensor!r} (also {_format_loc(other)})")
                                )
                        else:
                            sensor_places[sensor] = (sensor_loc, explicit)
                        specs.append(
                            SlotSpec(slot_id, lot.id, zone.id, group.type, sensor, group.offline_after, fill_order)
                        )
                        fill_order += 1
                    for other, ids in clashes.items():
                        where = "listed twice in this group" if other == here else f"also {_format_loc(other)}"
                        noun = "id" if len(ids) == 1 else "ids"
                        problems.append(((*here, "ids"), f"duplicate slot {noun} {_listing(ids)} ({where})"))
        return specs

    def _check_gates(self, problems: list[tuple[Loc, str]]) -> None:
        lots = {lot.id for lot in self.lots}
        gate_places: dict[str, int] = {}
        camera_places: dict[str, int] = {}
        serial_places: dict[tuple[str, int], int] = {}
        for gi, gate in enumerate(self.gates):
            if gate.id in gate_places:
                problems.append(
                    (("gates", gi, "id"), f"duplicate gate id {gate.id!r} (also gates[{gate_places[gate.id]}])")
                )
            gate_places.setdefault(gate.id, gi)
            if gate.lot not in lots:
                problems.append((("gates", gi, "lot"), f"unknown lot {gate.lot!r}"))
            if gate.camera is not None:
                if gate.camera in camera_places:
                    problems.append(
                        (
                            ("gates", gi, "camera"),
                            f"camera {gate.camera!r} is also used by gates[{camera_places[gate.camera]}]",
                        )
                    )
                camera_places.setdefault(gate.camera, gi)
            if gate.serial is not None:
                line = (gate.serial.port, gate.serial.address)
                if line in serial_places:
                    problems.append(
                        (
                            ("gates", gi, "serial"),
                            f"port {line[0]!r} address {line[1]} is also used by gates[{serial_places[line]}]",
                        )
                    )
                serial_places.setdefault(line, gi)

    def _check_tariffs(self, problems: list[tuple[Loc, str]]) -> None:
        lots = {lot.id for lot in self.lots}
        tariff_places: dict[str, int] = {}
        for ti, tariff in enumerate(self.tariffs):
            if tariff.lot not in lots:
                problems.append((("tariffs", ti, "lot"), f"unknown lot {tariff.lot!r}"))
            elif tariff.lot in tariff_places:
                problems.append(
                    (
                        ("tariffs", ti, "lot"),
                        f"second tariff for lot {tariff.lot!r} (first at tariffs[{tariff_places[tariff.lot]}])",
                    )
                )
            tariff_places.setdefault(tariff.lot, ti)

    def slot_specs(self) -> list[SlotSpec]:
        """Every slot of every lot, in config order."""
        return list(self._slot_specs)

    def state_path(self) -> Path:
        """The state directory: `$STATE_DIRECTORY` (its first entry) when set, else `gateway.state_dir`."""
        from_systemd = os.environ.get("STATE_DIRECTORY", "")
        if from_systemd:
            # systemd joins several StateDirectory= entries with ':'; ours is the first.
            return Path(from_systemd.split(":")[0])
        return Path(self.gateway.state_dir)

    def plate_key_path(self) -> Path:
        """The plate HMAC key file; a relative `plate_key_file` is inside the state directory."""
        return self.state_path() / self.privacy.plate_key_file

    def upstream_topic_root(self) -> str | None:
        """The topic root used upstream (None without upstream)."""
        if self.upstream is None:
            return None
        return self.upstream.topic_root or self.gateway.topic_root


# ---- loading and errors ---------------------------------------------------------------------------


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            out += f".{key}" if out else key
    return out


def _error_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            lines.extend(f"{_format_loc(loc + sub) or '(top level)'}: {msg}" for sub, msg in cause.problems)
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif isinstance(cause, ValueError):
            message = str(cause)
        else:
            message = err["msg"]
            if isinstance(err["input"], str | int | float):
                message += f" (got {err['input']!r})"
        lines.append(f"{_format_loc(loc) or '(top level)'}: {message}")
    return lines


def parse_config(text: str, source: str = "<string>") -> GatewayConfig:
    """Validate TOML text; raises ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError carries the position only in its message.
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc), re.DOTALL)
        if m is None:
            raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
        raise ConfigError([f"{source}: invalid TOML at line {m[2]}, column {m[3]}: {m[1]}"]) from None
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc)) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a config file; raises ConfigError for everything that is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_config(text, str(path))


def bundled_demo_path() -> Path:
    """The demo site's config shipped inside the package."""
    return Path(str(files("gateway").joinpath("data", "demo.toml")))


def default_config_path() -> Path:
    """`$PARKING_GATEWAY_CONFIG`, else /etc/parking-gateway/gateway.toml if it exists, else the bundled demo."""
    from_env = os.environ.get("PARKING_GATEWAY_CONFIG", "")
    if from_env:
        return Path(from_env)
    if SYSTEM_CONFIG_PATH.exists():
        return SYSTEM_CONFIG_PATH
    return bundled_demo_path()


# ---- reference documentation ----------------------------------------------------------------------


def _type_label(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_label(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is list:
        return f"array of {_type_label(args[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_label(a) for a in args if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, str(annotation))


def _default_label(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(table defaults)"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    value = field.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{json.dumps(value)}`"


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """(model, is an array of tables) when the field holds tables."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list:
        inner = _nested_model(args[0])
        return (inner[0], True) if inner else None
    if origin in (Union, types.UnionType):
        for arg in args:
            inner = _nested_model(arg)
            if inner:
                return inner
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def config_reference_markdown() -> str:
    """The key reference of docs/configuration.md, generated from the models' descriptions."""
    sections: list[str] = []
    seen: dict[type[BaseModel], str] = {}

    def table(model: type[BaseModel], heading: str, level: int, prefix: str) -> None:
        seen[model] = heading
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        nested: list[tuple[type[BaseModel], str, bool]] = []
        for field_name, field in model.model_fields.items():
            key = field.alias or field_name
            rows.append(
                f"| `{key}` | {_type_label(field.annotation)} | {_default_label(field)} | {field.description} |"
            )
            inner = _nested_model(field.annotation)
            if inner is not None:
                nested.append((inner[0], prefix + key, inner[1]))
        doc = (model.__doc__ or "").strip()
        sections.append(f"{'#' * level} {heading}\n\n{doc}\n\n" + "\n".join(rows) + "\n")
        # The top level's tables are siblings of it in the document, deeper tables are subsections.
        child_level = min(level + 1, 4) if prefix else level
        for inner_model, inner_name, inner_array in nested:
            inner_heading = f"`[[{inner_name}]]`" if inner_array else f"`[{inner_name}]`"
            if inner_model in seen:
                sections.append(f"{'#' * child_level} {inner_heading}\n\nSame keys as {seen[inner_model]}.\n")
            else:
                table(inner_model, inner_heading, child_level, inner_name + ".")

    table(GatewayConfig, "Top level", 3, "")
    return "\n".join(sections)
