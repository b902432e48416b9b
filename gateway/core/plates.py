"""Plate normalisation, confusable matching and the vehicle token (keyed HMAC)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import unicodedata
from pathlib import Path

MAX_PLATE_LEN = 16

# Characters plate readers confuse; each maps to one representative so "B0" and "8O" compare equal.
_CONFUSABLE = str.maketrans({"0": "O", "D": "O", "Q": "O", "1": "I", "5": "S", "8": "B", "2": "Z"})


class PlateError(ValueError):
    pass


def normalise(plate: str) -> str:
    """Upper-case letters and digits only: "ab 123-cd" -> "AB123CD"."""
    text = unicodedata.normalize("NFKC", plate).upper()
    out = "".join(ch for ch in text if ch.isalnum())
    if not out:
        raise PlateError("plate has no letters or digits")
    if len(out) > MAX_PLATE_LEN:
        raise PlateError(f"plate longer than {MAX_PLATE_LEN} characters")
    return out


def confusion_key(plate: str) -> str:
    return plate.translate(_CONFUSABLE)


def within_one_edit(a: str, b: str) -> bool:
    """True when a and b differ by at most one substitution, insertion or deletion."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la > lb:
        a, b, la, lb = b, a, lb, la
    i = 0
    while i < la and a[i] == b[i]:
        i += 1
    if la == lb:
        return a[i + 1 :] == b[i + 1 :]
    return a[i:] == b[i + 1 :]


class PlateKey:
    """The HMAC key that turns plates into vehicle tokens; created 0600 on first start."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise PlateError("plate key shorter than 16 bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> PlateKey:
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race: use its key
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    def token(self, normalised_plate: str) -> str:
        digest = hmac.new(self._key, normalised_plate.encode(), hashlib.sha256).hexdigest()
        return "v-" + digest[:32]
