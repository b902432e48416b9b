"""Requests on R/request/<verb> (contract §3.3): validate, decide through the writer, reply after commit.

`handle` gives the MQTT link a future that resolves once the request's outcome is committed (or needed no
commit), so that its PUBACK follows the decision; False when the writer stopped first.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gateway.core.clock import SYSTEM_CLOCK, Clock, iso_ms, parse_rfc3339
from gateway.core.domain import (
    Block,
    CancelReservation,
    Command,
    Enter,
    Exit,
    GateModeName,
    OpenGate,
    Pay,
    Reply,
    Reserve,
    SetGateMode,
    Unblock,
)
from gateway.core.exits import charges
from gateway.core.plates import PlateError, PlateKey, normalise
from gateway.core.settings import Settings
from gateway.mqtt.link import Incoming, MqttLink
from gateway.mqtt.topics import Topics, match
from gateway.store.reads import ReadStore
from gateway.store.writer import Writer, WriterClosed

log = structlog.get_logger("gateway.requests")

MAX_REQUEST = 16 * 1024
STOP_GRACE_S = 2.0
LOG_EVERY = 60.0
# A change the store cannot commit this long is answered `unavailable` (guarantee 8) and never made.
COMMIT_PATIENCE_S = 10.0
Text = Field(min_length=1, max_length=128)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    transaction: str = Field(min_length=1, max_length=128)


class EnterRequest(_Request):
    vehicle: str = Text
    lot: str = Text
    zone: str | None = None
    type: str | None = None
    gate: str | None = None


class ExitRequest(_Request):
    vehicle: str | None = None
    session_id: str | None = None
    gate: str | None = None


class AvailabilityRequest(_Request):
    lot: str = Text
    zone: str | None = None
    type: str | None = None


class SlotRequest(_Request):
    slot: str = Text
    reason: str = Field("", max_length=200)


class SessionsRequest(_Request):
    lot: str | None = None
    active: bool | None = None


def _time(value: str) -> float:
    return parse_rfc3339(value)


class ReserveRequest(_Request):
    reservation_id: str = Text
    vehicle: str = Text
    lot: str = Text
    type: str | None = None
    zone: str | None = None
    start: Annotated[float, BeforeValidator(_time)]
    end: Annotated[float, BeforeValidator(_time)]


class CancelReservationRequest(_Request):
    reservation_id: str = Text


class QuoteRequest(_Request):
    session_id: str | None = Field(None, min_length=1, max_length=128)
    vehicle: str | None = Field(None, min_length=1, max_length=128)
    lot: str | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _which(self) -> QuoteRequest:
        if (self.session_id is None) == (self.vehicle is None or self.lot is None):
            raise ValueError("give session_id, or vehicle and lot")
        return self


class PayRequest(_Request):
    session_id: str = Text
    amount: int = Field(ge=0)
    payment_ref: str = Text


class OpenGateRequest(_Request):
    gate: str = Text
    reason: str = Field(max_length=200)
    actor: str = Text


class SetGateModeRequest(_Request):
    gate: str = Text
    mode: GateModeName
    actor: str | None = Field(None, min_length=1, max_length=128)


VERBS: dict[str, type[_Request]] = {
    "enter": EnterRequest,
    "exit": ExitRequest,
    "availability": AvailabilityRequest,
    "block": SlotRequest,
    "unblock": SlotRequest,
    "sessions": SessionsRequest,
    "reserve": ReserveRequest,
    "cancel_reservation": CancelReservationRequest,
    "quote": QuoteRequest,
    "pay": PayRequest,
    "open_gate": OpenGateRequest,
    "set_gate_mode": SetGateModeRequest,
}


def _command(verb: str, req: _Request) -> Command:
    key = f"tx:{req.transaction}"
    if isinstance(req, EnterRequest):
        return Enter(vehicle=req.vehicle, lot=req.lot, zone=req.zone, type=req.type, gate=req.gate, idempotency_key=key)
    if isinstance(req, ExitRequest):
        return Exit(vehicle=req.vehicle, session_id=req.session_id, gate=req.gate, idempotency_key=key)
    if isinstance(req, ReserveRequest):
        return Reserve(
            reservation_id=req.reservation_id,
            vehicle=req.vehicle,
            lot=req.lot,
            start=req.start,
            end=req.end,
            type=req.type,
            zone=req.zone,
            idempotency_key=key,
        )
    if isinstance(req, CancelReservationRequest):
        return CancelReservation(reservation_id=req.reservation_id, idempotency_key=key)
    if isinstance(req, PayRequest):
        return Pay(session_id=req.session_id, amount=req.amount, payment_ref=req.payment_ref, idempotency_key=key)
    if isinstance(req, OpenGateRequest):
        return OpenGate(gate=req.gate, actor=req.actor, note=req.reason, idempotency_key=key)
    if isinstance(req, SetGateModeRequest):
        return SetGateMode(gate=req.gate, mode=req.mode, actor=req.actor, idempotency_key=key)
    assert isinstance(req, SlotRequest)
    cls = Block if verb == "block" else Unblock
    return cls(slot=req.slot, reason=req.reason, idempotency_key=key)


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """Where the replies to requests that came in over one link go: that link, under its own R."""

    link: MqttLink
    topics: Topics


class Requests:
    """Each request is handled in its own task so one slow reply never holds up the MQTT link."""

    name = "requests"

    def __init__(
        self,
        writer: Writer,
        reads: ReadStore,
        topics: Topics,
        lots: set[str],
        link: MqttLink,
        *,
        response_topics: tuple[str, ...] = (),
        settings: Settings,
        key: PlateKey,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._writer = writer
        self._reads = reads
        self._topics = topics
        self._lots = lots
        self._settings = settings
        self._key = key
        self._clock = clock
        self.link = link
        # Where an MQTT 5 response topic may point: the gateway's account may publish where a requester may not.
        self._response_filters = (topics.response("#"), *response_topics)
        self.handled = 0
        self.invalid = 0
        self.failed = 0
        self.rejected: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}
        self._tasks: set[asyncio.Task[bool]] = set()
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False

    async def run(self) -> None:
        return

    async def stop(self) -> None:
        """Let requests in flight finish (their replies are queued on the link), then cancel what remains."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def health(self) -> dict[str, Any]:
        return {
            "handled": self.handled,
            "invalid": self.invalid,
            "failed": self.failed,
            "rejected": dict(self.rejected),
            "in_flight": len(self._tasks),
        }

    async def handle(self, msg: Incoming, via: ReplyRoute | None = None) -> asyncio.Future[bool]:
        """A request from the local input, or with `via` from another link (upstream); handled the same way.
        The future says whether the outcome is final (committed, or needing no commit): then it may be acked."""
        if self._stopping:
            # Shutting down: no decision starts now, and the request is not acknowledged.
            refused: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            refused.set_result(False)
            return refused
        verb = msg.topic.rsplit("/", 1)[-1]
        task = asyncio.create_task(self._serve(verb, msg, via))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, verb: str, msg: Incoming, via: ReplyRoute | None) -> bool:
        """Answer the request; whether its outcome is final (committed, or needing no commit)."""
        try:
            transaction, reply, final = await self._answer(verb, msg.payload)
        except Exception:
            # Every request gets a reply; the requester may repeat it with the same transaction. Final: the same
            # request delivered again would meet the same failure.
            log.exception("request failed", verb=verb)
            self.failed += 1
            transaction, reply = _transaction(msg.payload), Reply.error("unavailable", "internal error; try again")
            final = True
        self.handled += 1
        if not reply.ok and reply.code == "invalid_request":
            self.invalid += 1
        link, filters, topics = (
            (via.link, (via.topics.response("#"),), via.topics)
            if via is not None
            else (self.link, self._response_filters, self._topics)
        )
        link.publish(
            self._reply_topic(verb, msg.response_topic, topics, filters),
            json.dumps(reply.to_json(transaction), separators=(",", ":")),
            qos=1,
            correlation_data=msg.correlation_data,
            droppable=False,
        )
        return final

    def _reply_topic(self, verb: str, asked: str | None, topics: Topics, filters: tuple[str, ...]) -> str:
        """The MQTT 5 response topic when it matches `filters` (R/response/# of the link the request came in on,
        and locally [broker] response_topics), else that link's R/response/<verb>."""
        default = topics.response(verb)
        if asked is None:
            return default
        if asked and "+" not in asked and "#" not in asked and "\x00" not in asked:
            if any(match(allowed, asked) is not None for allowed in filters):
                return asked
        self.rejected["response_topic"] += 1
        now = self._clock.monotonic()
        if now - self._last_logged.get("response_topic", -LOG_EVERY) >= LOG_EVERY:
            self._last_logged["response_topic"] = now
            log.warning("request rejected", reason="response_topic", response_topic=asked[:200], replied_on=default)
        return default

    async def _answer(self, verb: str, payload: bytes) -> tuple[str | None, Reply, bool]:
        transaction: str | None = None
        try:
            if len(payload) > MAX_REQUEST:
                return None, Reply.error("invalid_request", f"request larger than {MAX_REQUEST} bytes"), True
            doc = json.loads(payload, parse_constant=_no_constant)
            transaction = _transaction_of(doc)
            model = VERBS.get(verb)
            if model is None:
                return transaction, Reply.error("invalid_request", f"unknown verb {verb!r}"), True
            req = model.model_validate(doc)
        except (ValueError, RecursionError) as exc:
            return transaction, Reply.error("invalid_request", _problem(exc)), True
        try:
            return transaction, await self._do(verb, req), True
        except WriterClosed:
            # Not committed: with a persistent session the broker delivers the request again after the restart.
            return transaction, Reply.error("unavailable", "the gateway is shutting down"), False

    async def _do(self, verb: str, req: _Request) -> Reply:
        if isinstance(req, AvailabilityRequest | SessionsRequest | QuoteRequest):
            # Reads keep no transaction, but one that a change already holds is not theirs (the writer
            # checks the changes' own verbs).
            used_by = await self._reads.transaction_verb(f"tx:{req.transaction}")
            if used_by is not None:
                return Reply.error("conflict", f"this transaction belongs to an earlier {used_by!r} request")
        if isinstance(req, AvailabilityRequest):
            if req.lot not in self._lots:
                return Reply.error("unknown_lot", f"no lot {req.lot!r}")
            return Reply(True, await self._reads.availability(req.lot, req.zone, req.type))
        if isinstance(req, SessionsRequest):
            rows = await self._reads.sessions(req.lot, req.active)
            for row in rows:
                for key in ("started_at", "ended_at"):
                    if row[key] is not None:
                        row[key] = iso_ms(row[key])
            return Reply(True, {"sessions": rows})
        if isinstance(req, QuoteRequest):
            return await self._quote(req)
        return await self._writer.submit(_command(verb, req), give_up_after=COMMIT_PATIENCE_S)

    async def _quote(self, req: QuoteRequest) -> Reply:
        """What is due now: read side only (the fee's read path never queues behind the writer)."""
        if req.session_id is not None:
            session = await self._reads.active_session(session_id=req.session_id)
        else:
            assert req.vehicle is not None and req.lot is not None
            if req.lot not in self._lots:
                return Reply.error("unknown_lot", f"no lot {req.lot!r}")
            try:
                token = self._key.token(normalise(req.vehicle))
            except PlateError as exc:
                return Reply.error("invalid_request", f"vehicle: {exc}")
            session = await self._reads.active_session(lot=req.lot, token=token)
        if session is None:
            return Reply.error("unknown_session", "no active session matches")
        c = charges(self._settings.tariffs.get(session["lot"]), session, self._clock.wall())
        return Reply(
            True,
            {
                "session_id": session["id"],
                "amount": c.amount,
                "currency": c.currency,
                "paid": c.paid,
                "due": c.due,
                "paid_until": None if c.paid_until is None else iso_ms(c.paid_until),
            },
        )


def _transaction_of(doc: object) -> str | None:
    value = doc.get("transaction") if isinstance(doc, dict) else None
    return value[:128] if isinstance(value, str) else None


def _transaction(payload: bytes) -> str | None:
    try:
        return _transaction_of(json.loads(payload))
    except (ValueError, RecursionError):
        return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "request"
            parts.append(f"{loc}: {err['msg']}")
        return "; ".join(parts)
    if isinstance(exc, RecursionError):
        return "request nested too deeply"
    return f"invalid JSON: {exc}"[:200]
