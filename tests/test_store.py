"""The store's schema management: versioned migrations, refusal of a newer store."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store.schema import MIGRATIONS, StoreError, connect, migrate


def test_migrate_is_idempotent_and_versioned(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gateway.db")
    assert migrate(conn) == len(MIGRATIONS)
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_store_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gateway.db")
    migrate(conn)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this release"):
        migrate(conn)


def test_synchronous_normal_is_configurable(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gateway.db", synchronous="NORMAL")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
