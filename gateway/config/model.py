"""The whole configuration file: one field per table, and the cross-checks between tables."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from gateway.config.access import AccessConfig, Permit
from gateway.config.base import Loc, Problems, StrictModel, format_loc
from gateway.config.broker import BrokerConfig
from gateway.config.gates import GateConfig
from gateway.config.gateway import GatewaySection
from gateway.config.homeassistant import HA_ID, HomeAssistantConfig
from gateway.config.ingress import IngressConfig
from gateway.config.lots import LotConfig, SlotGroup, SlotSpec
from gateway.config.policy import PolicyConfig
from gateway.config.privacy import PrivacyConfig
from gateway.config.sensors import SensorsConfig
from gateway.config.store import StoreConfig
from gateway.config.tariffs import TariffConfig
from gateway.config.timing import TimingConfig
from gateway.config.upstream import UpstreamConfig

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class _Zone:
    index: int
    id: str | None  # None: the zone's id itself is invalid (reported as a field error)
    groups: list[tuple[int, SlotGroup]]  # the groups that validated, with their places


@dataclass(frozen=True, slots=True)
class _Lot:
    index: int
    id: str | None
    zones: list[_Zone]


def _listing(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5])
    return shown if len(ids) <= 5 else f"{shown} and {len(ids) - 5} more"


class GatewayConfig(StrictModel):
    """The whole configuration file."""

    gateway: GatewaySection = Field(description="This gateway.")
    # Omitted tables are validated from {} rather than built, so that an invalid default (the default
    # broker is embedded and closed: it needs a users_file) is reported by path like any other error.
    broker: BrokerConfig = Field(default_factory=dict, validate_default=True, description="The local broker.")
    upstream: UpstreamConfig | None = Field(None, description="Upstream sync; absent: none.")
    homeassistant: HomeAssistantConfig | None = Field(None, description="Home Assistant discovery; absent: none.")
    ingress: IngressConfig = Field(default_factory=dict, validate_default=True, description="Device topics.")
    timing: TimingConfig = Field(default_factory=dict, validate_default=True, description="Durations.")
    sensors: SensorsConfig = Field(default_factory=dict, validate_default=True, description="Sensor health.")
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
        lots = [_Lot(li, lot.id, [_Zone(zi, z.id, list(enumerate(z.slots))) for zi, z in enumerate(lot.zones)])
                for li, lot in enumerate(self.lots)]  # fmt: skip
        problems, specs = cross_check(
            lots, list(enumerate(self.gates)), list(enumerate(self.tariffs)), list(enumerate(self.access.permits))
        )
        self._check_homeassistant(problems, specs)
        if problems:
            raise Problems(problems)
        self._slot_specs = tuple(specs)
        return self

    def _check_homeassistant(self, problems: list[tuple[Loc, str]], specs: list[SlotSpec]) -> None:
        ha = self.homeassistant
        if ha is None:
            return
        if ha.broker == "upstream" and self.upstream is None:
            problems.append((("homeassistant", "broker"), '"upstream" needs an [upstream] table'))
        pattern = re.compile(HA_ID)
        reason = "Home Assistant discovery ids allow only letters, digits, '_' and '-'"
        for gi, gate in enumerate(self.gates):
            if not pattern.match(gate.id):
                problems.append((("gates", gi, "id"), f"{gate.id!r}: {reason}"))
        types: dict[str, set[str]] = {}
        for spec in specs:
            types.setdefault(spec.lot, set()).add(spec.type)
        for li, lot in enumerate(self.lots):
            for zi, zone in enumerate(lot.zones):
                if not pattern.match(zone.id):
                    problems.append((("lots", li, "zones", zi, "id"), f"{zone.id!r}: {reason}"))
                elif zone.id in types.get(lot.id, set()):
                    problems.append(
                        (
                            ("lots", li, "zones", zi, "id"),
                            f"zone {zone.id!r} is also a slot type of lot {lot.id!r}: their Home Assistant "
                            f"unique ids ({self.gateway.id}_{lot.id}_{zone.id}_available) would be the same",
                        )
                    )

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


# --- the cross-checks between tables, in one place: for a valid file, and for what validated of a broken one


def cross_check(
    lots: Sequence[_Lot],
    gates: Sequence[tuple[int, GateConfig]],
    tariffs: Sequence[tuple[int, TariffConfig]],
    permits: Sequence[tuple[int, Permit]] | None,
) -> tuple[list[tuple[Loc, str]], list[SlotSpec]]:
    """Duplicate ids and references between tables; each piece with its place in the file.

    `permits` is None when `[access]` did not validate. Returns the problems and the slot specs.
    """
    problems: list[tuple[Loc, str]] = []
    specs = _check_lots(lots, problems)
    lot_ids = {lot.id for lot in lots if lot.id is not None}
    _check_gates(lot_ids, gates, problems)
    _check_tariffs(lot_ids, tariffs, problems)
    slot_types = {spec.type for spec in specs}
    for p, permit in permits or ():
        for t, type_ in enumerate(permit.types):
            if type_ not in slot_types:
                problems.append((("access", "permits", p, "types", t), f"no slot has type {type_!r}"))
    return problems, specs


def _check_lots(lots: Sequence[_Lot], problems: list[tuple[Loc, str]]) -> list[SlotSpec]:
    specs: list[SlotSpec] = []
    lot_places: dict[str, int] = {}
    slot_places: dict[str, Loc] = {}
    # sensor id -> (where, set explicitly); two defaulted sensors collide only when slot ids do.
    sensor_places: dict[str, tuple[Loc, bool]] = {}
    for lot in lots:
        li = lot.index
        if lot.id is not None:
            if lot.id in lot_places:
                problems.append((("lots", li, "id"), f"duplicate lot id {lot.id!r} (also lots[{lot_places[lot.id]}])"))
            lot_places.setdefault(lot.id, li)
        zone_places: dict[str, int] = {}
        fill_order = 0
        for zone in lot.zones:
            zi = zone.index
            if zone.id is not None:
                if zone.id in zone_places:
                    problems.append(
                        (
                            ("lots", li, "zones", zi, "id"),
                            f"duplicate zone id {zone.id!r} (also lots[{li}].zones[{zone_places[zone.id]}])",
                        )
                    )
                zone_places.setdefault(zone.id, zi)
            for gi, group in zone.groups:
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
                            problems.append((sensor_loc, f"duplicate sensor id {sensor!r} (also {format_loc(other)})"))
                    else:
                        sensor_places[sensor] = (sensor_loc, explicit)
                    specs.append(
                        SlotSpec(
                            slot_id,
                            lot.id or "",
                            zone.id or "",
                            group.type,
                            sensor,
                            group.offline_after,
                            fill_order,
                            group.battery_low,
                        )
                    )
                    fill_order += 1
                for other, ids in clashes.items():
                    where = "listed twice in this group" if other == here else f"also {format_loc(other)}"
                    noun = "id" if len(ids) == 1 else "ids"
                    problems.append(((*here, "ids"), f"duplicate slot {noun} {_listing(ids)} ({where})"))
    return specs


def _check_gates(lots: set[str], gates: Sequence[tuple[int, GateConfig]], problems: list[tuple[Loc, str]]) -> None:
    gate_places: dict[str, int] = {}
    camera_places: dict[str, int] = {}
    serial_places: dict[tuple[str, int], int] = {}
    port_places: dict[str, tuple[int, int]] = {}
    for gi, gate in gates:
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
            # Gates on one line share its serial port, so they share its speed.
            first = port_places.setdefault(gate.serial.port, (gi, gate.serial.baudrate))
            if first[1] != gate.serial.baudrate:
                problems.append(
                    (
                        ("gates", gi, "serial", "baudrate"),
                        f"port {gate.serial.port!r} runs at {first[1]} baud for gates[{first[0]}]",
                    )
                )


def _check_tariffs(
    lots: set[str], tariffs: Sequence[tuple[int, TariffConfig]], problems: list[tuple[Loc, str]]
) -> None:
    tariff_places: dict[str, int] = {}
    for ti, tariff in tariffs:
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


def _valid(model: type[M], raw: object) -> M | None:
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _items(raw: object) -> list[tuple[int, Any]]:
    return list(enumerate(raw)) if isinstance(raw, list) else []


def _valid_items(model: type[M], raw: object) -> list[tuple[int, M]]:
    return [(i, v) for i, item in _items(raw) if (v := _valid(model, item)) is not None]


def cross_check_raw(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """The cross-checks on what validated of a file that has field errors (so that one hides nothing).

    A lot or zone with an error still lends its id (when it is a string) and its valid slot groups; a gate,
    tariff or `[access]` with an error is left out, its own errors are reported already.
    """
    lots: list[_Lot] = []
    for li, raw_lot in _items(data.get("lots")):
        if not isinstance(raw_lot, dict):
            continue
        zones: list[_Zone] = []
        for zi, raw_zone in _items(raw_lot.get("zones")):
            if isinstance(raw_zone, dict):
                zone_id = raw_zone.get("id")
                groups = _valid_items(SlotGroup, raw_zone.get("slots"))
                zones.append(_Zone(zi, zone_id if isinstance(zone_id, str) else None, groups))
        lot_id = raw_lot.get("id")
        lots.append(_Lot(li, lot_id if isinstance(lot_id, str) else None, zones))
    access = _valid(AccessConfig, data.get("access", {}))
    problems, _ = cross_check(
        lots,
        _valid_items(GateConfig, data.get("gates")),
        _valid_items(TariffConfig, data.get("tariffs")),
        None if access is None else list(enumerate(access.permits)),
    )
    return problems
