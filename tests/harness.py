"""A running gateway and an MQTT observer for the integration tests (real brokers only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.core.clock import SYSTEM_CLOCK, Clock

R = "parking/gw1"


def site_config(
    state_dir: Path, *, port: int, embedded: bool, broker_extra: str = "", extra: str = ""
) -> GatewayConfig:
    if embedded and "users_file" not in broker_extra and "acl_file" not in broker_extra:
        # The tests' anonymous clients act as devices, operators and displays: an ACL file says they may
        # (the default rule keeps requests and replies from anonymous clients).
        acl = state_dir.parent / "anonymous.acl"
        acl.parent.mkdir(parents=True, exist_ok=True)
        acl.write_text("topic readwrite #\n")
        broker_extra = f'acl_file = "{acl}"\n{broker_extra}'
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
[broker]
embedded = {str(embedded).lower()}
port = {port}
{"allow_anonymous = true" if embedded and "users_file" not in broker_extra else ""}
{broker_extra}
[timing]
debounce = 0.2
reread_window = 5
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-006" }}]
  [[lots.zones]]
  id = "B"
  slots = [{{ ids = "B-001..B-002", type = "ev" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
[[gates]]
id = "out1"
lot = "lot1"
direction = "exit"
camera = "cam-out1"
{extra}
"""
    )


@contextlib.asynccontextmanager
async def running(cfg: GatewayConfig, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg, clock=clock)
    task = asyncio.create_task(gw.run())
    ready = asyncio.create_task(gw.wait_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises the startup error
    assert ready in done, "gateway did not start"
    await gw.link.wait_connected(10)
    try:
        yield gw
    finally:
        gw.stop()
        await asyncio.wait_for(task, 20)


@dataclass
class Observer:
    """Subscribes to everything under R and records it; publishes like a device or an operator."""

    client: aiomqtt.Client
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self, type_: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The live events seen so far, of `type_` and with the fields in `match`, in order."""
        out = [json.loads(p) for t, p, _ in self.messages if t == f"{R}/events"]
        return [
            e for e in out if (type_ is None or e["type"] == type_) and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_event(self, type_: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        """Until `count` such events have come; all of them so far."""
        found: list[dict[str, Any]] = await self.wait_for(
            lambda: len(self.events(type_, **match)) >= count and self.events(type_, **match)
        )
        return found

    def state(self, topic: str) -> Any:
        raw = self.retained.get(topic)
        return None if raw is None else json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()

    async def wait_for(self, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not met in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    async def pub(self, topic: str, payload: Any, **kw: Any) -> None:
        data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        await self.client.publish(topic, data, qos=1, **kw)

    async def request(self, verb: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        body = {"transaction": str(uuid.uuid4()), **body}
        await self.pub(f"{R}/request/{verb}", body)

        def reply() -> dict[str, Any] | None:
            for t, p, _ in self.messages:
                if t == f"{R}/response/{verb}":
                    doc: dict[str, Any] = json.loads(p)
                    if doc.get("transaction") == body["transaction"]:
                        return doc
            return None

        result: dict[str, Any] = await self.wait_for(reply, timeout)
        return result


@contextlib.asynccontextmanager
async def observer(port: int, *, username: str | None = None, password: str | None = None) -> AsyncIterator[Observer]:
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"obs-{uuid.uuid4().hex[:8]}", username=username, password=password
    ) as client:
        obs = Observer(client)
        await client.subscribe(f"{R}/#", qos=1)

        async def pump() -> None:
            async for m in client.messages:
                payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
                obs.messages.append((m.topic.value, payload, m.retain))
                obs.retained[m.topic.value] = payload
                obs._changed.set()

        task = asyncio.create_task(pump())
        try:
            yield obs
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
