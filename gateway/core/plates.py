"""Plate normalisation, confusable matching and the vehicle token (keyed HMAC)."""

from __future__ import annotations

import contextlib
import fcntl
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


def reread_key(gate: str, plate: str) -> str:
    """The idempotency key of a normalised plate read at a gate: confusable characters merged, so that a re-read
    that misreads B as 8 is still the same car at the same gate."""
    return f"rr:{gate}:{confusion_key(plate)}"


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
        """The key in `path`, or a new one made there once, however many processes start at the same time.

        A new key is written to a temporary file, fsynced, and linked into place, and the directory fsynced:
        `path` never holds a partial key. `link` fails when another process got there first: its key is used.
        An empty file (a crash of an older release between create and write) never served a token, so it is
        replaced; that happens under a lock on the directory, so that racing processes replace it only once.
        """
        key = cls._read(path)
        if key is not None:
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            key = cls._read(path)
            if key is not None:
                return key
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # empty
            return cls._create(path, dir_fd)
        finally:
            os.close(dir_fd)  # drops the flock

    @classmethod
    def _read(cls, path: Path) -> PlateKey | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if data and len(data) < 16:
            raise PlateError(f"{path}: plate key shorter than 16 bytes (damaged? restore it from the backup)")
        return cls(data) if data else None

    @classmethod
    def _create(cls, path: Path, dir_fd: int) -> PlateKey:
        key = secrets.token_bytes(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits of the mode above; 0600 adds none back
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return cls(path.read_bytes())  # someone else's, complete: theirs were linked only after fsync
        finally:
            os.unlink(tmp)
        os.fsync(dir_fd)
        return cls(key)

    def token(self, normalised_plate: str) -> str:
        digest = hmac.new(self._key, normalised_plate.encode(), hashlib.sha256).hexdigest()
        return "v-" + digest[:32]
