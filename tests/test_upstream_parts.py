"""The pieces of upstream sync without a broker: node rotation and backoff, the [upstream] table, status and audit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.mqtt.reconnect import Reconnect
from gateway.store.audit import audit
from gateway.store.schema import connect, db_path
from gateway.store.status import render_text, status_document
from tests.upstream_rig import rig, upstream_config

HEAD = '[gateway]\nid = "gw1"\n[broker]\nallow_anonymous = true\n[[lots]]\nid = "l"\n  [[lots.zones]]\n  id = "z"\n'
HEAD += '  slots = [{ ids = "S1" }]\n'


def errors_of(upstream: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + "[upstream]\n" + upstream)
    return info.value.errors


# --- node rotation and backoff


@settings(max_examples=200, deadline=None)
@given(
    nodes=st.integers(1, 5),
    steps=st.lists(st.sampled_from(["fail", "held"]), max_size=60),
    rand=st.floats(0, 1),
)
def test_nodes_in_turn_and_the_wait_stays_under_a_capped_doubling_ceiling(
    nodes: int, steps: list[str], rand: float
) -> None:
    endpoints = [(f"h{i}", 1000 + i) for i in range(nodes)]
    r = Reconnect(endpoints, initial=0.5, maximum=30.0, rand=lambda: rand)
    assert r.current == endpoints[0] and r.delay() == 0.0
    index = 0
    streak = 0
    for step in steps:
        if step == "fail":
            r.failed()
            index = (index + 1) % nodes
            streak += 1
        else:
            r.held()
            streak = 0
        assert r.current == endpoints[index]  # the next node after each failure, round robin
        ceiling = r.ceiling()
        assert 0.5 <= ceiling <= 30.0
        # the first round of failures (one per node) waits at most `initial`; each further round doubles
        assert ceiling == min(30.0, 0.5 * 2 ** ((streak - 1) // nodes if streak else 0))
        delay = r.delay()
        assert delay == (0.0 if streak == 0 else rand * ceiling)


def test_reconnect_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Reconnect([], initial=1, maximum=2)
    with pytest.raises(ValueError, match="initial"):
        Reconnect([("h", 1)], initial=3, maximum=2)


# --- the [upstream] table


def test_hosts_are_the_nodes_in_order_with_a_default_port() -> None:
    cfg = parse_config(HEAD + '[upstream]\nhosts = ["b1.example:1883", "b2.example", "[::1]:8884"]\n')
    assert cfg.upstream is not None
    assert cfg.upstream.nodes() == [("b1.example", 1883), ("b2.example", 8883), ("::1", 8884)]
    assert cfg.upstream.mqtt_version == "auto"
    single = parse_config(HEAD + '[upstream]\nhost = "b"\nport = 1884\nmqtt_version = "3.1.1"\n').upstream
    assert single is not None and single.nodes() == [("b", 1884)]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("", ["upstream.host: set host (and port) or hosts"]),
        ('host = "a"\nhosts = ["b:1"]\n', ["upstream.hosts: set either host (and port) or hosts, not both"]),
        ('hosts = ["b:1"]\nport = 1883\n', ["upstream.port: goes with host; with hosts each entry carries its port"]),
        ('hosts = ["b:1", "b:70000", "c d:1", "b:1"]\n', [
            "upstream.hosts[1]: port out of range 1..65535: 'b:70000'",
            "upstream.hosts[2]: not host:port: 'c d:1'",
            "upstream.hosts[3]: 'b:1' is also hosts[0]",
        ]),
        ("hosts = []\n", ["upstream.hosts: List should have at least 1 item after validation, not 0"]),
        ('host = "a"\nmqtt_version = "4"\n', [
            "upstream.mqtt_version: Input should be '5', '3.1.1' or 'auto' (got '4')",
        ]),
    ],
)  # fmt: skip
def test_upstream_errors_are_named_by_path(upstream: str, expected: list[str]) -> None:
    assert errors_of(upstream) == expected


# --- status and audit on a real store


async def test_status_shows_the_backlog_and_the_age_of_its_oldest_entry(tmp_path: Path) -> None:
    cfg = upstream_config(tmp_path, "host = '127.0.0.1'\nport = 1")
    async with rig(cfg, start=False) as r:
        await r.sensor_flips(4)
        conn = connect(r.db, readonly=True)
        try:
            (oldest,) = conn.execute("SELECT MIN(created_at) FROM outbox").fetchone()
            doc = status_document(conn, now=oldest + 3725)
        finally:
            conn.close()
    box = doc["outbox"]
    assert box["backlog"] == 8  # 4 slot.status, 4 alerts (occupied without a session)
    assert box["bytes"] > 8 * 100
    assert box["oldest_age_s"] == 3725
    assert box["compacted"] == {"entries": 0, "events": 0}
    assert f"outbox: 8 entries, {box['bytes']} bytes, oldest 62 min old" in render_text(doc)


RESIZE = "UPDATE outbox_size SET (rows, bytes) = (SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox)"


def _damaged(path: Path, *statements: str, resize: bool = True) -> list[str]:
    """Audit after `statements` behind the writer's back (the kept size made to match, unless not `resize`)."""
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    if resize:
        conn.execute(RESIZE)
    conn.commit()
    conn.close()
    ro = connect(path, readonly=True)
    try:
        return audit(ro)
    finally:
        ro.close()


async def test_audit_tells_a_tombstone_from_a_hole(tmp_path: Path) -> None:
    cfg = upstream_config(tmp_path, "host = '127.0.0.1'\nport = 1")
    async with rig(cfg, start=False) as r:
        await r.sensor_flips(10)  # seq 1..20: a slot.status and an alert each
    db = db_path(cfg.state_path())
    assert _damaged(db, resize=False) == []
    # rows deleted behind the writer's back: the kept size no longer matches
    assert _damaged(db, "DELETE FROM outbox WHERE seq = 20", resize=False)[-1].startswith(
        "outbox: its size is kept as 20 entries"
    )
    assert _damaged(db, "UPDATE meta SET value = '20' WHERE key = 'next_seq'") == []
    # a prefix acknowledged and deleted: still one range
    assert _damaged(db, "DELETE FROM outbox WHERE seq <= 2") == []
    # a hole
    assert _damaged(db, "DELETE FROM outbox WHERE seq IN (5, 6)") == [
        "outbox: seq 5..6 missing (no compaction tombstone covers them)"
    ]
    # the same hole under a tombstone of 4..6 is compaction, not loss
    tomb = """UPDATE outbox SET type = 'compacted', body = '{"to_seq":6,"count":3}' WHERE seq = 4"""
    assert _damaged(db, tomb) == []
    # a tombstone that claims more than it replaced hides nothing: the row inside it is reported
    assert _damaged(db, """UPDATE outbox SET body = '{"to_seq":8,"count":5}' WHERE seq = 4""") == [
        "outbox: seq 7 lies inside the compaction tombstone ending at 8",
        "outbox: seq 8 lies inside the compaction tombstone ending at 8",
    ]
    assert _damaged(db, """UPDATE outbox SET body = '{"to_seq":6,"count":3}' WHERE seq = 4""") == []
    # the newest events lost
    assert _damaged(db, "DELETE FROM outbox WHERE seq >= 14") == ["outbox: last seq 13 but the next to assign is 20"]
