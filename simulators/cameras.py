"""Simulated plate cameras: a plain JSON camera and a Plate Recognizer Stream webhook."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from typing import Any, Literal

import aiomqtt

from simulators import rfc3339

CameraFormat = Literal["json", "platerecognizer"]

# The confusion classes of contract §6 (exit matching): a misread stays within one class.
CONFUSABLE: tuple[str, ...] = ("O0DQ", "I1", "S5", "B8", "Z2")
_CLASS_OF = {ch: group for group in CONFUSABLE for ch in group}

# French SIV style (AA-123-AA) leaves out I, O and U; misreads can still produce them.
_PLATE_LETTERS = "ABCDEFGHJKLMNPQRSTVWXYZ"


def random_plate(rng: random.Random) -> str:
    """A normalised plate such as `AB123CD`."""
    letters = [rng.choice(_PLATE_LETTERS) for _ in range(4)]
    digits = f"{rng.randrange(1000):03d}"
    return f"{letters[0]}{letters[1]}{digits}{letters[2]}{letters[3]}"


def misread(plate: str, rng: random.Random) -> str | None:
    """The plate with one character swapped for a confusable one, or None when none is confusable."""
    positions = [i for i, ch in enumerate(plate) if ch in _CLASS_OF]
    if not positions:
        return None
    i = rng.choice(positions)
    wrong = rng.choice([c for c in _CLASS_OF[plate[i]] if c != plate[i]])
    return plate[:i] + wrong + plate[i + 1 :]


def spaced(plate: str, sep: str) -> str:
    """`AB123CD` as `AB 123 CD` (or with another separator): cameras print plates as on the plate."""
    return sep.join(re.findall(r"[A-Z]+|[0-9]+|[^A-Z0-9]+", plate))


class PlateCamera:
    """One camera; `read` publishes what it sees of one car (1..n reads sharing one event)."""

    def __init__(
        self,
        client: aiomqtt.Client,
        camera_id: str,
        *,
        fmt: CameraFormat,
        rng: random.Random,
        misread_rate: float = 0.0,
        repeat_reads: tuple[int, int] = (1, 3),
        repeat_gap_s: float = 0.1,
        qos: int = 1,
    ) -> None:
        self.client = client
        self.camera_id = camera_id
        self.fmt = fmt
        self.rng = rng
        self.misread_rate = misread_rate
        self.repeat_reads = repeat_reads
        self.repeat_gap_s = repeat_gap_s
        self.qos = qos
        self.reads = 0
        self.misreads = 0

    @property
    def topic(self) -> str:
        suffix = "reads" if self.fmt == "json" else "platerecognizer"
        return f"cameras/{self.camera_id}/{suffix}"

    async def read(self, plate: str) -> str:
        """Publish the repeated reads of one passing car; returns their shared event id."""
        event_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        seen_at = time.time()
        count = self.rng.randint(*self.repeat_reads)
        for i in range(count):
            if i:
                await asyncio.sleep(self.repeat_gap_s)
            top = plate
            if self.rng.random() < self.misread_rate:
                wrong = misread(plate, self.rng)
                if wrong is not None:
                    top = wrong
                    self.misreads += 1
            await self.client.publish(self.topic, self._encode(event_id, plate, top, seen_at), qos=self.qos)
            self.reads += 1
        return event_id

    def _candidates(self, truth: str, top: str) -> list[tuple[str, float]]:
        """Ranked alternatives, the best first; the true plate is always among them."""
        if top != truth:
            score = round(self.rng.uniform(0.55, 0.8), 3)
            return [(top, score), (truth, round(score - self.rng.uniform(0.01, 0.1), 3))]
        score = round(self.rng.uniform(0.85, 0.99), 3)
        ranked = [(truth, score)]
        alt = misread(truth, self.rng)
        if alt is not None and self.rng.random() < 0.5:
            ranked.append((alt, round(score - self.rng.uniform(0.2, 0.4), 3)))
        return ranked

    def _encode(self, event_id: str, truth: str, top: str, seen_at: float) -> bytes:
        ranked = self._candidates(truth, top)
        if self.fmt == "json":
            doc: dict[str, Any] = {
                "event_id": event_id,
                "plate": spaced(top, self.rng.choice(("", " ", "-"))),
                "confidence": ranked[0][1],
                "ts": rfc3339(seen_at),
                "candidates": [p for p, _ in ranked],
            }
            return json.dumps(doc).encode()
        return json.dumps(self._stream_webhook(event_id, ranked, seen_at)).encode()

    def _stream_webhook(self, event_id: str, ranked: list[tuple[str, float]], seen_at: float) -> dict[str, Any]:
        """A Plate Recognizer Stream webhook body; repeats of one car keep its timestamp and filename."""
        ts = rfc3339(seen_at)
        filename = f"{self.camera_id}_screenshots/{ts[:10]}/{event_id}.jpg"
        top, score = ranked[0]
        x = self.rng.randint(200, 900)
        y = self.rng.randint(300, 600)
        return {
            "hook": {
                "target": f"mqtt://cameras/{self.camera_id}/platerecognizer",
                "id": self.camera_id,
                "event": "recognition",
                "filename": filename,
            },
            "data": {
                "camera_id": self.camera_id,
                "filename": filename,
                "timestamp": ts,
                "timestamp_local": ts,
                "timestamp_camera": None,
                "results": [
                    {
                        "box": {"xmin": x, "ymin": y, "xmax": x + 140, "ymax": y + 35},
                        "candidates": [{"plate": p.lower(), "score": s} for p, s in ranked],
                        "color": [{"color": "black", "score": 0.7}],
                        "dscore": round(self.rng.uniform(0.6, 0.95), 3),
                        "model_make": [{"make": "generic", "model": "unknown", "score": 0.5}],
                        "orientation": [{"orientation": "Front", "score": 0.9}],
                        "plate": top.lower(),
                        "region": {"code": "fr", "score": 0.8},
                        "score": score,
                        "vehicle": {
                            "box": {"xmin": x - 150, "ymin": y - 250, "xmax": x + 300, "ymax": y + 150},
                            "score": 0.85,
                            "type": "Sedan",
                        },
                        "direction": 90,
                        "source_url": f"rtsp://{self.camera_id}/stream",
                        "position_sec": round(seen_at % 3600, 3),
                    }
                ],
            },
        }
