"""TLS is never silently off: against a Mosquitto TLS listener and the embedded broker's own, with a CA and
certificates made here. The right CA and host name connect; a wrong CA, a wrong host name or `tls = {}`
(the system CAs) toward a private CA fail verification, and `tls = {}` never falls back to plain TCP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.mqtt.broker import BrokerOptions, EmbeddedBroker
from gateway.mqtt.link import Incoming, LinkOptions, MqttLink
from gateway.mqtt.tls import TlsOptions
from tests.conftest import MosquittoProcess, free_port

STATUS = "parking/gw1/status"
DEADLINE = 10.0


@dataclass(frozen=True)
class Pki:
    ca: Path  # signed the server certificate
    other_ca: Path  # signed nothing here
    server_cert: Path  # for the name "localhost" only, not 127.0.0.1
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _ca(directory: Path, common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{common}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _leaf(
    directory: Path,
    stem: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca = _ca(directory, "site-ca")
    _, _, other_ca = _ca(directory, "other-ca")
    server = _leaf(directory, "server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("localhost")])
    client = _leaf(directory, "client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(ca, other_ca, *server, *client)


@pytest.fixture
def mosquitto_tls(tmp_path: Path, pki: Pki) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(tmp_path, tls=(pki.ca, pki.server_cert, pki.server_key))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
async def tls_port(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[int]:
    """A TLS listener on 127.0.0.1 with the server certificate: Mosquitto's, or the embedded broker's."""
    if request.param == "mosquitto":
        yield request.getfixturevalue("mosquitto_tls").port
        return
    options = BrokerOptions(
        port=free_port(), allow_anonymous=True, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
    )
    async with EmbeddedBroker(options):
        yield options.port


async def _ignore(_: Incoming) -> None:
    return None


@contextlib.asynccontextmanager
async def link(
    host: str, port: int, tls: TlsOptions | None
) -> AsyncIterator[tuple[MqttLink, list[MutableMapping[str, Any]]]]:
    """A running MqttLink and the log entries it wrote."""
    with capture_logs() as logs:
        mqtt = MqttLink(
            LinkOptions(host, port, "gw1-local", STATUS, tls=tls, backoff_initial=0.05, backoff_max=0.2), _ignore
        )
        task = asyncio.create_task(mqtt.run())
        try:
            yield mqtt, logs
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def first_failure(logs: list[MutableMapping[str, Any]]) -> str:
    async with asyncio.timeout(DEADLINE):
        while True:
            for entry in logs:
                if entry["event"] == "mqtt.connect_failed":
                    return str(entry["error"])
            await asyncio.sleep(0.02)


async def connects(host: str, port: int, tls: TlsOptions) -> None:
    async with link(host, port, tls) as (mqtt, _):
        await mqtt.wait_connected(DEADLINE)


async def refused(host: str, port: int, tls: TlsOptions | None) -> str:
    async with link(host, port, tls) as (mqtt, logs):
        error = await first_failure(logs)
        assert not mqtt.connected
        return error


async def test_the_link_verifies_the_broker_certificate_and_host_name(tls_port: int, pki: Pki) -> None:
    await connects("localhost", tls_port, TlsOptions(ca=str(pki.ca)))
    assert "certificate verify failed" in await refused("localhost", tls_port, TlsOptions(ca=str(pki.other_ca)))
    # The certificate names localhost, not 127.0.0.1.
    assert "mismatch" in await refused("127.0.0.1", tls_port, TlsOptions(ca=str(pki.ca)))
    # tls = {}: the system's CAs, which never signed this site's certificate.
    assert "certificate verify failed" in await refused("localhost", tls_port, TlsOptions())


async def test_a_client_certificate_is_presented(tmp_path: Path, pki: Pki) -> None:
    broker = MosquittoProcess(
        tmp_path, extra_conf="require_certificate true", tls=(pki.ca, pki.server_cert, pki.server_key)
    )
    broker.start()
    try:
        with_cert = TlsOptions(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        await connects("localhost", broker.port, with_cert)
        # Without it the broker refuses: the certificate above is what let the link in.
        context = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("localhost", broker.port, identifier="no-cert", tls_context=context, timeout=2):
                pass
    finally:
        broker.stop()


def site(tmp_path: Path, broker: str) -> str:
    return f"""
[gateway]
id = "gw1"
state_dir = "{tmp_path / "state"}"
[broker]
{broker}
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-002" }}]
"""


async def test_tls_without_keys_is_verified_tls_never_plain_text(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    # An external broker that speaks plain MQTT: with `tls = {}` the gateway must not talk to it.
    cfg = parse_config(site(tmp_path, f"embedded = false\nport = {mosquitto.port}\ntls = {{}}"))
    gw = Gateway(cfg)
    with capture_logs() as logs:
        task = asyncio.create_task(gw.run())
        try:
            # The TLS handshake fails (the broker resets it); in plain text it would have connected.
            await first_failure(logs)
            assert gw.link is not None and not gw.link.connected
        finally:
            gw.stop()
            await asyncio.wait_for(task, DEADLINE)


async def test_the_embedded_broker_listens_with_tls_and_the_gateway_talks_to_it(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    tls = f'tls = {{ cert = "{pki.server_cert}", key = "{pki.server_key}" }}'
    # The gateway dials its bind address, which the certificate does not name: it trusts that certificate.
    cfg = parse_config(site(tmp_path, f'port = {port}\nallow_anonymous = true\nacl_file = "{tmp_path / "acl"}"\n{tls}'))
    (tmp_path / "acl").write_text("topic readwrite #\n")
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        await gw.wait_ready()
        assert gw.link is not None
        await gw.link.wait_connected(DEADLINE)
        context = ssl.create_default_context(cafile=str(pki.ca))
        async with aiomqtt.Client("localhost", port, identifier="display", tls_context=context) as display:
            await display.subscribe(STATUS, qos=1)
            async with asyncio.timeout(DEADLINE):
                message = await anext(aiter(display.messages))
            assert message.payload == b"online"
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="plain", timeout=2):
                pass
    finally:
        gw.stop()
        await asyncio.wait_for(task, DEADLINE)


@pytest.mark.parametrize(
    ("broker", "error"),
    [
        ("allow_anonymous = true\ntls = {}", "broker.tls.cert: the embedded broker's TLS listener needs cert and key"),
        ('allow_anonymous = true\ntls = { ca = "ca.pem" }', "broker.tls.cert: the embedded broker's TLS listener"),
        (
            'allow_anonymous = true\ntls = { ca = "ca.pem", cert = "c.pem", key = "k.pem" }',
            "broker.tls.ca: the embedded broker takes cert and key only",
        ),
    ],
)
def test_the_embedded_broker_needs_cert_and_key_for_tls(tmp_path: Path, broker: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_config(site(tmp_path, broker))


def test_an_external_broker_accepts_tls_without_keys(tmp_path: Path) -> None:
    cfg = parse_config(site(tmp_path, "embedded = false\ntls = {}"))
    assert cfg.broker.tls is not None and cfg.broker.tls.ca is None
