"""The embedded broker in password + ACL mode, with the real gateway behind it: nobody connects without a
valid password, and a device account reaches the gateway only through its own ingress topics — never
through another device's topic or the request topics. Operators get requests only through an ACL file.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.mqtt.broker import hash_password
from tests.conftest import free_port
from tests.harness import Observer, R, observer, running, site_config

PASSWORDS = {"gateway": "gw-secret", "A-001": "sensor-pw", "cam-in1": "camera-pw", "ops": "ops-pw"}
ACL_FILE = f"""# the gateway's own account
user gateway
topic readwrite #
user ops
topic write {R}/request/#
topic read {R}/#
pattern write sensors/%u/state
pattern write cameras/%u/reads
"""


@dataclass
class Site:
    cfg: GatewayConfig
    gw: Gateway
    obs: Observer  # connected with the gateway's own account, which may read everything
    acl_file: bool

    @property
    def port(self) -> int:
        return self.cfg.broker.port


def client(port: int, user: str | None, password: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=f"{user}-{uuid.uuid4().hex[:6]}", username=user, password=password
    )


@pytest.fixture(params=["default-acl", "acl-file"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Site]:
    users = tmp_path / "users"
    users.write_text("# user:argon2 hash\n" + "".join(f"{u}:{hash_password(pw)}\n" for u, pw in PASSWORDS.items()))
    acl_line = ""
    if request.param == "acl-file":
        (tmp_path / "acl").write_text(ACL_FILE)
        acl_line = f'acl_file = "{tmp_path / "acl"}"'
    cfg = site_config(
        tmp_path / "state",
        port=free_port(),
        embedded=True,
        broker_extra=f"""allow_anonymous = false
users_file = "{users}"
username = "gateway"
password = "{PASSWORDS["gateway"]}"
{acl_line}""",
    )
    async with running(cfg) as gw, observer(cfg.broker.port, username="gateway", password=PASSWORDS["gateway"]) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        yield Site(cfg, gw, obs, request.param == "acl-file")


async def test_anonymous_and_wrong_passwords_are_refused(site: Site) -> None:
    for user, password in ((None, None), ("A-001", "wrong"), ("A-001", None), ("ghost", "sensor-pw")):
        with pytest.raises(aiomqtt.MqttError):
            async with client(site.port, user, password):
                pass
    # the right password for the same account is let in: the refusals above are about the credentials
    async with client(site.port, "A-001", PASSWORDS["A-001"]):
        pass


def slot_events(obs: Observer, slot: str) -> list[str]:
    return [e["status"] for e in obs.events("slot.status") if e["slot"] == slot]


async def test_device_reaches_only_its_own_topics(site: Site) -> None:
    obs, gw = site.obs, site.gw
    assert gw.requests is not None
    async with client(site.port, "A-001", PASSWORDS["A-001"]) as dev:
        await dev.publish("sensors/A-001/state", json.dumps({"occupied": True, "seq": 10}), qos=1)
        await obs.wait_for(lambda: slot_events(obs, "A-001") == ["occupied"])
        # Another sensor's topic, a camera's topic, and the requests: the broker must drop all three.
        await dev.publish("sensors/A-002/state", json.dumps({"occupied": True, "seq": 10}), qos=1)
        await dev.publish("cameras/cam-in1/reads", json.dumps({"event_id": "forged", "plate": "AB123CD"}), qos=1)
        await dev.publish(
            f"{R}/request/enter", json.dumps({"transaction": "forged", "vehicle": "AB123CD", "lot": "lot1"}), qos=1
        )
        await dev.publish(f"{R}/request/block", json.dumps({"transaction": "forged-b", "slot": "A-003"}), qos=1)
        # Sent last on the same connection: once the gateway has committed it, anything forwarded before
        # it would have been seen.
        await dev.publish("sensors/A-001/state", json.dumps({"occupied": False, "seq": 11}), qos=1)
        await obs.wait_for(lambda: slot_events(obs, "A-001") == ["occupied", "available"])
    assert gw.ingress.tracker.last_seen("A-002") is None
    assert gw.ingress.accepted["camera"] == 0 and gw.requests.handled == 0
    assert not [t for t, _, _ in obs.messages if t.startswith(f"{R}/response/")]
    assert {e["type"] for e in obs.events()} == {"slot.status", "alert"}  # the unregistered occupancy of A-001
    assert obs.state(f"{R}/slots/A-002")["sensor"] == "none"
    assert obs.state(f"{R}/slots/A-003")["status"] == "available"


async def test_camera_account_starts_a_session(site: Site) -> None:
    obs = site.obs
    async with client(site.port, "cam-in1", PASSWORDS["cam-in1"]) as cam:
        await cam.publish("cameras/cam-in1/reads", json.dumps({"event_id": "e1", "plate": "AB 123 CD"}), qos=1)
        started = await obs.wait_for(lambda: obs.events("session.started"))
    assert [(e["slot"], e["gate"]) for e in started] == [("A-001", "in1")]


async def test_operator_requests_only_with_an_acl_file(site: Site) -> None:
    gw = site.gw
    assert gw.requests is not None
    if site.acl_file:
        async with observer(site.port, username="ops", password=PASSWORDS["ops"]) as ops:
            reply = await ops.request("enter", {"vehicle": "OPS 1", "lot": "lot1"})
            assert reply["status"] == "ok" and reply["data"]["slot"] == "A-001"
            await ops.wait_for(lambda: ops.events("session.started"))
        assert gw.requests.handled == 1
        return
    # The default rule gives an operator account only ingress topics named after it: a request is dropped,
    # while its "sensor" message gets through (and is rejected by the gateway as an unknown device).
    obs = site.obs
    async with client(site.port, "ops", PASSWORDS["ops"]) as ops_client:
        body = {"transaction": "ops-1", "vehicle": "OPS 1", "lot": "lot1"}
        await ops_client.publish(f"{R}/request/enter", json.dumps(body), qos=1)
        await ops_client.publish("sensors/ops/state", json.dumps({"occupied": True}), qos=1)
        await obs.wait_for(lambda: [a for a in obs.events("alert") if a["subject"] == {"device": "ops"}])
    assert gw.requests.handled == 0 and not obs.events("session.started")
    assert not [t for t, _, _ in obs.messages if t.startswith(f"{R}/response/")]
