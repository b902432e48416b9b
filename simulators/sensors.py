"""A fleet of simulated occupancy sensors: JSON sensors and LoRaWAN sensors behind The Things Stack."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt

from simulators import rfc3339

SensorFormat = Literal["json", "tts"]

_HEX_EUI = re.compile(r"^[0-9a-fA-F]{16}$")


@dataclass
class SimSensor:
    """One device: its id, its wire format, and what it last reported."""

    sensor_id: str
    fmt: SensorFormat
    occupied: bool = False
    seq: int = 0
    battery: float = 3.6


class SensorFleet:
    """Publishes sensor reports on the device topics of contract §3.1, with optional wire misbehaviour.

    `flap_rate`: share of transitions preceded by a brief report of the opposite state (shorter than the
    gateway's debounce). `duplicate_rate`: share of transitions whose last message is published twice.
    `reorder_rate`: share of transitions whose last two messages reach the wire in swapped order (a
    transition without a flap gets an extra heartbeat so there are two).
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        sensors: list[SimSensor],
        *,
        tts_app: str = "parking@ttn",
        rng: random.Random,
        duplicate_rate: float = 0.0,
        reorder_rate: float = 0.0,
        flap_rate: float = 0.0,
        flap_s: float = 1.0,
        qos: int = 1,
    ) -> None:
        self.client = client
        self.sensors = {s.sensor_id: s for s in sensors}
        self.tts_app = tts_app
        self.rng = rng
        self.duplicate_rate = duplicate_rate
        self.reorder_rate = reorder_rate
        self.flap_rate = flap_rate
        self.flap_s = flap_s
        self.qos = qos
        self.published = 0

    def payload(self, s: SimSensor, *, now: float) -> tuple[str, bytes]:
        """Topic and bytes of a report of the sensor's current state and seq."""
        return self._encode(s, s.occupied, s.seq, now)

    def _encode(self, s: SimSensor, occupied: bool, seq: int, now: float) -> tuple[str, bytes]:
        if s.fmt == "json":
            doc: dict[str, Any] = {
                "occupied": occupied,
                "ts": rfc3339(now),
                "seq": seq,
                "battery": round(s.battery, 2),
            }
            return f"sensors/{s.sensor_id}/state", json.dumps(doc).encode()
        return f"v3/{self.tts_app}/devices/{s.sensor_id}/up", json.dumps(
            self._tts_uplink(s, occupied, seq, now)
        ).encode()

    def _tts_uplink(self, s: SimSensor, occupied: bool, seq: int, now: float) -> dict[str, Any]:
        """A TTS v3 `as.up.data` message as the MQTT integration delivers it."""
        digest = hashlib.sha256(s.sensor_id.encode()).hexdigest().upper()
        dev_eui = s.sensor_id.upper() if _HEX_EUI.match(s.sensor_id) else digest[:16]
        app_id, _, tenant = self.tts_app.partition("@")
        battery_dv = round(s.battery * 10)
        frm = base64.b64encode(bytes([1 if occupied else 0, battery_dv])).decode()
        ts = rfc3339(now)
        rssi = self.rng.randint(-118, -70)
        snr = round(self.rng.uniform(-12.0, 10.0), 1)
        concentrator_ts = int(now * 1_000_000) % 2**32
        return {
            "end_device_ids": {
                "device_id": s.sensor_id,
                "application_ids": {"application_id": app_id},
                "dev_eui": dev_eui,
                "join_eui": "0000000000000000",
                "dev_addr": digest[16:24],
            },
            "correlation_ids": [f"as:up:{digest[:26]}{seq:06d}"],
            "received_at": ts,
            "uplink_message": {
                "session_key_id": base64.b64encode(bytes.fromhex(digest[24:56])).decode(),
                "f_port": 1,
                "f_cnt": seq,
                "frm_payload": frm,
                "decoded_payload": {"occupied": occupied, "battery": round(s.battery, 2)},
                "rx_metadata": [
                    {
                        "gateway_ids": {"gateway_id": f"{tenant or 'ttn'}-gw-1", "eui": "B827EBFFFE000001"},
                        "time": ts,
                        "timestamp": concentrator_ts,
                        "rssi": rssi,
                        "channel_rssi": rssi,
                        "snr": snr,
                        "uplink_token": base64.b64encode(digest[:24].encode()).decode(),
                        "channel_index": self.rng.randint(0, 7),
                        "received_at": ts,
                    }
                ],
                "settings": {
                    "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7, "coding_rate": "4/5"}},
                    "frequency": "868100000",
                    "timestamp": concentrator_ts,
                    "time": ts,
                },
                "received_at": ts,
                "consumed_airtime": "0.051456s",
                "network_ids": {
                    "net_id": "000013",
                    "tenant_id": tenant or "ttn",
                    "cluster_id": "eu1",
                    "cluster_address": "eu1.cloud.thethings.network",
                },
            },
        }

    def _next(self, s: SimSensor, occupied: bool) -> tuple[str, bytes]:
        s.seq += 1
        s.battery = max(2.8, s.battery - 0.0001)
        return self._encode(s, occupied, s.seq, time.time())

    async def _publish(self, topic: str, data: bytes) -> None:
        await self.client.publish(topic, data, qos=self.qos)
        self.published += 1

    async def set_state(self, sensor_id: str, occupied: bool) -> None:
        """Report a transition, with the configured flaps, duplicates and reordering."""
        s = self.sensors[sensor_id]
        messages: list[tuple[str, bytes]] = []
        flapped = self.rng.random() < self.flap_rate
        if flapped:
            messages.append(self._next(s, not occupied))
        messages.append(self._next(s, occupied))
        s.occupied = occupied
        if self.rng.random() < self.reorder_rate:
            if len(messages) == 1:
                messages.append(self._next(s, occupied))
            messages[-2], messages[-1] = messages[-1], messages[-2]
        if self.rng.random() < self.duplicate_rate:
            messages.append(messages[-1])
        for i, (topic, data) in enumerate(messages):
            if i == 1 and flapped:
                await asyncio.sleep(self.flap_s)
            await self._publish(topic, data)

    async def heartbeat(self, sensor_id: str) -> None:
        """The same state again, seq + 1."""
        s = self.sensors[sensor_id]
        await self._publish(*self._next(s, s.occupied))

    async def heartbeat_all(self) -> None:
        """Every sensor reports its state again, seq + 1."""
        for sensor_id in list(self.sensors):
            await self.heartbeat(sensor_id)

    async def reboot(self, sensor_id: str) -> None:
        """The device restarts: its counter starts again and its first report carries seq 1."""
        s = self.sensors[sensor_id]
        s.seq = 0
        await self._publish(*self._next(s, s.occupied))

    async def run_heartbeats(self, interval: float) -> None:
        """Heartbeat every sensor each `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat_all()

    async def run_load(self, rate: float, duration: float | None, *, max_in_flight: int = 1000) -> None:
        """Random transitions at `rate` per second (a bench load), until `duration` or cancellation.

        A sensor with a transition still in flight is not picked, so each device's seqs stay in order
        apart from the deliberate reordering.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        busy: set[str] = set()
        slots = asyncio.Semaphore(max_in_flight)
        ids = list(self.sensors)

        async def one(sensor_id: str) -> None:
            try:
                await self.set_state(sensor_id, not self.sensors[sensor_id].occupied)
            finally:
                busy.discard(sensor_id)
                slots.release()

        async with asyncio.TaskGroup() as tg:
            n = 0
            while True:
                n += 1
                due = n / rate
                if duration is not None and due >= duration:
                    break
                delay = start + due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sensor_id = self.rng.choice(ids)
                if sensor_id in busy:
                    continue
                await slots.acquire()
                busy.add(sensor_id)
                tg.create_task(one(sensor_id))
