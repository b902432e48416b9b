"""A live terminal view of one gateway, fed only by its MQTT topics (contract §3.2, §4).

It subscribes to `R/status`, `R/lots/+/availability`, `R/gates/+`, `R/events` and `R/health`; reserved slots
come from the availability documents, reservations and revenue from the events (`reservation.*`, `session.ended`
fees, `payment.confirmed`, `payment.requested`), each gate's barrier, mode and vehicle from its retained state and
how often it went up and down from the changes of that state, the OPENs the gateway decided from the `gate.opened`
events. The only other input is
an optional callable returning monotonic counters (e.g. a simulator's published messages) shown as rates.
On a terminal it redraws in place (ANSI clear-and-home, at most 4 times a second); elsewhere (CI, pipes)
it prints one plain summary line every 2 s, without escape codes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from typing import Any, TextIO

import aiomqtt

__all__ = ["LiveView"]

Counters = Callable[[], Mapping[str, int]]

CLEAR_HOME = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
TTY_REFRESH_S = 0.25
PLAIN_EVERY_S = 2.0
RATE_WINDOW_S = 5.0
BAR_WIDTH = 24
COUNT_KEYS = ("available", "occupied", "reserved", "blocked")
# The fields that tell one event line apart, in the order they are shown (contract §4).
RESERVATION_KINDS = ("created", "arrived", "moved", "no_show", "cancelled")
EVENT_FIELDS = ("slot", "from_slot", "to_slot", "gate", "zone", "reason", "code", "reservation_id")
# A barrier that reaches `closed` from one of these closed once (from `offline` it only came back); one that
# is `opening`, or `open` straight from `closed` or `closing`, opened once (`open` after `offline` came back).
MOVING = frozenset({"opening", "open", "closing"})


def _count(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def bar(doc: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """`[###rx.....]`: occupied, reserved, blocked and available shares of a counts document."""
    total = _count(doc, "total")
    if total <= 0:
        return "[" + " " * width + "]"
    cells = ""
    for key, mark in (("occupied", "#"), ("reserved", "r"), ("blocked", "x")):
        cells += mark * round(width * _count(doc, key) / total)
    cells = cells[:width]
    return "[" + cells + "." * (width - len(cells)) + "]"


def counts_line(name: str, doc: Mapping[str, Any], width: int = 19) -> str:
    counts = "  ".join(f"{_count(doc, k)} {k}" for k in COUNT_KEYS[1:])
    free = f"{_count(doc, 'available')}/{_count(doc, 'total')} available"
    return f"{name:<{width}} {bar(doc)} {free:<18} {counts}"


def event_line(event: Mapping[str, Any]) -> str:
    """One line per event: seq, type, and whichever of slot/gate/reason/... it carries."""
    seq = event.get("seq")
    parts = [f"#{seq:<6}" if isinstance(seq, int) else "#?     ", f"{event.get('type', '?')!s:<20}"]
    parts += [f"{k}={event[k]}" for k in EVENT_FIELDS if event.get(k) is not None]
    if event.get("type") == "alert" and isinstance(event.get("subject"), dict):
        parts += [f"{k}={v}" for k, v in event["subject"].items()]
    return " ".join(parts).rstrip()


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


class _Rate:
    """Per-second rate of a monotonic counter over the last RATE_WINDOW_S seconds."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, value: int) -> float:
        self.samples.append((now, value))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, v0 = self.samples[0]
        return (value - v0) / (now - t0) if now > t0 else 0.0


class LiveView:
    """What the gateway has published, and how to show it. `root` is `<topic_root>/<gateway.id>`."""

    def __init__(
        self,
        root: str,
        out: TextIO,
        *,
        tty: bool | None = None,
        counters: Counters | None = None,
        header: str = "",
        max_events: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.counters = counters
        self.header = header
        self.clock = clock
        self.started = clock()
        self.status: str | None = None
        self.online = asyncio.Event()
        self.availability: dict[str, dict[str, Any]] = {}
        self.lowest_available: dict[str, int] = {}
        self.health: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.events_seen = 0
        self.events_by_type: Counter[str] = Counter()
        self.last_seq: int | None = None
        self.seq_gaps = 0
        self.invalid = 0
        self._rates: dict[str, _Rate] = {}
        # Minor units per currency: fees of ended sessions, paid at pay stations, billed at the exit.
        self.revenue: Counter[str] = Counter()
        self.paid: Counter[str] = Counter()
        self.billed: Counter[str] = Counter()
        # Per gate: its latest R/gates document; openings and closings seen in those; OPENs audited (gate.opened),
        # and of those the manual ones (open_gate).
        self.gates: dict[str, dict[str, Any]] = {}
        self.gate_opened: Counter[str] = Counter()
        self.gate_closed: Counter[str] = Counter()
        self.gate_opens: Counter[str] = Counter()
        self.gate_manual: Counter[str] = Counter()
        self._gate_change = asyncio.Event()  # set (and replaced) at every gate state

    @property
    def filters(self) -> list[str]:
        r = self.root
        return [f"{r}/status", f"{r}/lots/+/availability", f"{r}/gates/+", f"{r}/events", f"{r}/health"]

    # ---- input ------------------------------------------------------------------------------------

    async def follow(self, client: aiomqtt.Client) -> None:
        """Subscribe on a connected client (whose message queue this view owns) and handle until cancelled."""
        await client.subscribe([(f, 1) for f in self.filters])
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.handle(str(message.topic), payload)

    def handle(self, topic: str, payload: bytes) -> None:
        """Take in one message of the gateway's topics; anything malformed is counted and skipped."""
        rest = topic.removeprefix(self.root + "/")
        if rest == topic:
            return
        if rest == "status":
            self.status = payload.decode("utf-8", "replace")
            if self.status == "online":
                self.online.set()
            else:
                self.online.clear()
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            self.invalid += 1
            return
        if not isinstance(doc, dict):
            self.invalid += 1
        elif rest == "events":
            self._event(doc)
        elif rest == "health":
            self.health = doc
        elif rest.startswith("gates/") and rest.count("/") == 1:
            self._gate(rest.removeprefix("gates/"), doc)
        elif rest.startswith("lots/") and rest.endswith("/availability"):
            lot = rest.removeprefix("lots/").removesuffix("/availability")
            self.availability[lot] = doc
            available = _count(doc, "available")
            self.lowest_available[lot] = min(self.lowest_available.get(lot, available), available)

    def _gate(self, gate: str, doc: dict[str, Any]) -> None:
        last = self.gates.get(gate, {})
        if str(doc.get("ts", "")) < str(last.get("ts", "")):
            return  # older than what is shown (a retained copy delivered after a newer live one): not a change
        before, now = last.get("barrier"), doc.get("barrier")
        if now == "closed" and before in MOVING:
            self.gate_closed[gate] += 1
        elif (now == "opening" and before != now) or (now == "open" and before in ("closed", "closing")):
            self.gate_opened[gate] += 1
        self.gates[gate] = doc
        self._gate_change.set()
        self._gate_change = asyncio.Event()

    async def gates_online(self, gates: Collection[str]) -> None:
        """Return once each of `gates` has a barrier state other than `offline` (its controller talks)."""
        while any(self.gates.get(g, {}).get("barrier") in (None, "offline") for g in gates):
            await self._gate_change.wait()

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.events_seen += 1
        kind = str(event.get("type", "?"))
        self.events_by_type[kind] += 1
        if kind == "gate.opened" and isinstance(event.get("gate"), str):
            self.gate_opens[event["gate"]] += 1
            if event.get("reason") == "manual":
                self.gate_manual[event["gate"]] += 1
        money = event.get("fee") if kind == "session.ended" else event
        if isinstance(money, dict):
            amount, currency = money.get("amount"), money.get("currency")
            if isinstance(amount, int) and not isinstance(amount, bool) and isinstance(currency, str):
                bucket = {"session.ended": self.revenue, "payment.confirmed": self.paid}.get(kind)
                bucket = self.billed if kind == "payment.requested" else bucket
                if bucket is not None:
                    bucket[currency] += amount
        seq = event.get("seq")
        if isinstance(seq, int):
            # QoS 1 may redeliver; only a jump forward is a loss.
            if self.last_seq is not None and seq > self.last_seq + 1:
                self.seq_gaps += seq - self.last_seq - 1
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)

    # ---- output -----------------------------------------------------------------------------------

    def rates(self) -> dict[str, float]:
        """Per-second rates: gateway events, and each of the counters."""
        now = self.clock()
        values = {"events": self.events_seen, **(self.counters() if self.counters else {})}
        return {name: self._rates.setdefault(name, _Rate()).update(now, v) for name, v in values.items()}

    def _rates_text(self) -> str:
        return ", ".join(f"{name} {rate:.1f}/s" for name, rate in self.rates().items())

    def frame(self) -> str:
        """The full terminal picture, without escape codes."""
        width = shutil.get_terminal_size((100, 30)).columns
        uptime = self.clock() - self.started
        lines = [
            f"parking-gateway demo  {self.header}".rstrip(),
            f"gateway {self.root}: {self.status or 'waiting'}   {uptime:5.1f} s   {self._rates_text()}",
        ]
        if self.health is not None:
            h = self.health
            lines.append(
                f"health: uptime {h.get('uptime_s', '?')} s, queue {h.get('queue_depth', '?')}, "
                f"outbox {h.get('outbox_backlog', '?')}, db {h.get('db_bytes', '?')} bytes"
            )
        for lot, doc in sorted(self.availability.items()):
            lines += ["", counts_line(f"lot {lot}", doc)]
            for group in ("zones", "types"):
                docs = doc.get(group)
                if isinstance(docs, dict):
                    lines += [
                        "  " + counts_line(f"{group[:-1]} {name}", d, 17)
                        for name, d in sorted(docs.items())
                        if isinstance(d, dict)
                    ]
        if not self.availability:
            lines += ["", "no availability published yet"]
        if self.gates:
            lines += ["", "gates:"] + ["  " + self.gate_row(g) for g in self.gate_ids()]
        lines += ["", self.reservations_line(), self.revenue_line()]
        gaps = f", {self.seq_gaps} missing by seq" if self.seq_gaps else ""
        lines += ["", f"events: {self.events_seen} seen{gaps}; latest:"]
        lines += ["  " + event_line(e) for e in reversed(self.events)]
        return "\n".join(line[:width] for line in lines)

    def gate_ids(self) -> list[str]:
        return sorted(set(self.gates) | set(self.gate_opens))

    def gate_row(self, gate: str) -> str:
        """`in1      open     normal        vehicle  up 4    down 3    OPENs 12`: one line of the terminal view."""
        doc = self.gates.get(gate, {})
        vehicle = "vehicle" if doc.get("vehicle_present") is True else "-"
        return (
            f"{gate:<8} {doc.get('barrier', '?')!s:<8} {doc.get('mode', '?')!s:<13} {vehicle:<8} "
            f"up {self.gate_opened[gate]:<4} down {self.gate_closed[gate]:<4} OPENs {self.gate_opens[gate]}"
        )

    def gates_text(self) -> str:
        """`gates in1 open 5/4, out1 closed 2/2 (opened/closed)`: every gate, for a plain line."""
        parts = [
            f"{g} {self.gates.get(g, {}).get('barrier', '?')} {self.gate_opened[g]}/{self.gate_closed[g]}"
            for g in self.gate_ids()
        ]
        return "gates " + ", ".join(parts) + " (opened/closed)"

    def gate_lines(self) -> list[str]:
        """Per gate, for a summary: how often it opened and closed, on whose OPENs, and how it was left."""
        lines = []
        for gate in self.gate_ids():
            doc = self.gates.get(gate, {})
            vehicle = "a vehicle on its loops" if doc.get("vehicle_present") is True else "no vehicle"
            lines.append(
                f"gate {gate}: opened {_times(self.gate_opened[gate])}, closed {_times(self.gate_closed[gate])} "
                f"({self.gate_opens[gate]} OPENs, {self.gate_manual[gate]} by hand); "
                f"now {doc.get('barrier', 'unknown')}, mode {doc.get('mode', 'unknown')}, {vehicle}"
            )
        return lines

    def reservations_line(self) -> str:
        counts = {k: self.events_by_type.get(f"reservation.{k}", 0) for k in RESERVATION_KINDS}
        return "reservations: " + ", ".join(f"{n} {k.replace('_', '-')}" for k, n in counts.items())

    def revenue_line(self) -> str:
        """Fees of the sessions that ended so far, and how they were settled."""

        def money(c: Counter[str]) -> str:
            return " + ".join(f"{n / 100:.2f} {cur}" for cur, n in sorted(c.items())) or "0.00"

        return (
            f"revenue so far: {money(self.revenue)} (paid at pay stations {money(self.paid)}, "
            f"billed at exit {money(self.billed)})"
        )

    def summary_line(self) -> str:
        """One plain line: status, availability per lot, rates, the latest event."""
        parts = [f"t={self.clock() - self.started:.1f}s", f"gateway={self.status or 'waiting'}"]
        for lot, doc in sorted(self.availability.items()):
            parts.append(f"{lot}: {_count(doc, 'available')}/{_count(doc, 'total')} available")
        parts.append(f"events={self.events_seen}")
        if self.gates:
            parts.append(self.gates_text())
        if self.revenue:
            parts.append(self.revenue_line().removesuffix(")").replace(" (", "; "))
        parts.append(self._rates_text())
        if self.events:
            parts.append("last " + event_line(self.events[-1]))
        return " | ".join(parts)

    def availability_lines(self) -> list[str]:
        """The final availability of each lot, for a summary."""
        if not self.availability:
            return ["availability: none published"]
        return [
            f"availability {lot}: {_count(doc, 'available')}/{_count(doc, 'total')} available, "
            + ", ".join(f"{_count(doc, k)} {k}" for k in COUNT_KEYS[1:])
            + f" (lowest available seen: {self.lowest_available.get(lot, _count(doc, 'available'))})"
            for lot, doc in sorted(self.availability.items())
        ]

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def draw(self) -> None:
        """One update: a redraw in place on a terminal, else a plain line."""
        if self.tty:
            self._write(CLEAR_HOME + self.frame() + "\n")
        else:
            self._write(self.summary_line() + "\n")

    async def display(self) -> None:
        """Draw until cancelled; on a terminal the cursor is hidden meanwhile and restored after."""
        self._write(HIDE_CURSOR if self.tty else f"parking-gateway demo: {self.header}\n")
        try:
            while True:
                self.draw()
                await asyncio.sleep(TTY_REFRESH_S if self.tty else PLAIN_EVERY_S)
        finally:
            if self.tty:
                self._write(SHOW_CURSOR)
