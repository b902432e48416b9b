"""The embedded broker's users_file: `user:argon2-hash` lines, edited in place like mosquitto_passwd does."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gateway.mqtt.broker import hash_password

_USER = re.compile(r"^[^:\s#][^:\s]{0,127}$")


class UsersFileError(Exception):
    pass


def set_password(path: Path, user: str, password: str | None) -> None:
    """Add or replace `user`'s line; `password=None` removes it. Written atomically, mode 0600."""
    if not _USER.match(user):
        raise UsersFileError(f"user name {user!r}: 1-128 characters, no ':' or spaces, not starting with '#'")
    if password is not None and not password:
        raise UsersFileError("empty password")
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot read: {exc.strerror}") from None
    kept = [line for line in lines if line.split(":", 1)[0].strip() != user]
    if password is None and len(kept) == len(lines):
        raise UsersFileError(f"{path}: no account {user!r}")
    if password is not None:
        kept.append(f"{user}:{hash_password(password)}")
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + ("\n" if kept else ""))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
