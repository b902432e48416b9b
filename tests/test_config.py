"""The configuration: models, slot ranges, cross-checks, error paths, file loading, shipped configs."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import gateway.config.loading as config_loading
from gateway.config import (
    ConfigError,
    GatewayConfig,
    SlotSpec,
    bundled_demo_path,
    config_reference_markdown,
    default_config_path,
    expand_slot_ids,
    load_config,
    parse_config,
)
from gateway.config import model as config_model

REPO = Path(__file__).resolve().parent.parent

HEAD = """
[gateway]
id = "gw1"

[broker]
allow_anonymous = true
"""

LOT = """
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "L1"
  slots = [
    { ids = "A-01..A-10" },
    { ids = "A-11..A-12", type = "ev" },
    { ids = ["A-13", "A-14"], type = "accessible" },
    { ids = "A-15", sensor = "lora-1", offline_after = 93600 },
  ]
"""

MINIMAL = HEAD + LOT


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def all_model_keys() -> set[str]:
    models: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [config_model.GatewayConfig]
    while todo:  # every table reachable from the top level
        model = todo.pop()
        models.add(model)
        for field in model.model_fields.values():
            for arg in (field.annotation, *typing.get_args(field.annotation)):
                for inner in (arg, *typing.get_args(arg)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in models:
                        todo.append(inner)
    return {field.alias or name for model in models for name, field in model.model_fields.items()}


# ---- the shipped configs ---------------------------------------------------------------------------


def test_demo_config_loads_and_is_the_bundled_one() -> None:
    path = bundled_demo_path()
    assert path.read_text() == (REPO / "config" / "demo.toml").read_text()
    cfg = load_config(path)
    specs = cfg.slot_specs()
    assert cfg.gateway.id == "demo"
    assert (cfg.broker.embedded, cfg.broker.allow_anonymous, cfg.broker.host, cfg.broker.port) == (
        True,
        True,
        "127.0.0.1",
        1883,
    )
    assert [lot.id for lot in cfg.lots] == ["lot1"] and cfg.lots[0].name == "Demo Garage"
    assert [z.id for z in cfg.lots[0].zones] == ["L1", "L2", "L3"]
    assert 100 <= len(specs) <= 140
    assert {"standard", "ev", "accessible"} <= {s.type for s in specs}
    assert [(g.direction, g.camera) for g in cfg.gates] == [
        ("entry", "cam-in1"),
        ("entry", "cam-in2"),
        ("exit", "cam-out1"),
        ("exit", "cam-out2"),
    ]
    assert all(g.serial is None for g in cfg.gates)
    assert [(t.lot, t.currency) for t in cfg.tariffs] == [("lot1", "EUR")]


def test_example_config_loads_and_shows_every_key() -> None:
    path = REPO / "config" / "gateway.example.toml"
    cfg = load_config(path)
    assert cfg.upstream is not None and cfg.gates[1].serial is not None
    text = path.read_text()
    missing = sorted(k for k in all_model_keys() if not re.search(rf"\b{k}\s*=|[\[.]{k}\]", text))
    assert missing == []


def test_docs_reference_is_current() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    assert docs.endswith(config_reference_markdown()), (
        "regenerate the reference part of docs/configuration.md from config_reference_markdown()"
    )
    for key in all_model_keys():
        assert f"| `{key}` |" in docs


# ---- slot ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ("L1-001..L1-003", ["L1-001", "L1-002", "L1-003"]),
        ("A-099..A-101", ["A-099", "A-100", "A-101"]),
        ("P8..P11", ["P8", "P9", "P10", "P11"]),
        ("07..09", ["07", "08", "09"]),
        ("P5..P5", ["P5"]),
        ("L1-113", ["L1-113"]),
        (["L1-111", "L1-112"], ["L1-111", "L1-112"]),
    ],
)
def test_slot_id_expansion(ids: str | list[str], expected: list[str]) -> None:
    assert expand_slot_ids(ids) == expected


def test_slot_specs_order_sensor_and_fill_order() -> None:
    second_lot = """
[[lots]]
id = "lot2"
  [[lots.zones]]
  id = "Z"
  slots = [{ ids = "B1..B2" }]
  [[lots.zones]]
  id = "Y"
  slots = [{ ids = "C1" }]
"""
    cfg = parse_config(MINIMAL + second_lot)
    specs = cfg.slot_specs()
    assert len(specs) == 18
    assert specs[0] == SlotSpec("A-01", "lot1", "L1", "standard", "A-01", None, 0)
    assert specs[10] == SlotSpec("A-11", "lot1", "L1", "ev", "A-11", None, 10)
    assert specs[14] == SlotSpec("A-15", "lot1", "L1", "standard", "lora-1", 93600.0, 14)
    assert [(s.id, s.lot, s.zone, s.fill_order) for s in specs[15:]] == [
        ("B1", "lot2", "Z", 0),
        ("B2", "lot2", "Z", 1),
        ("C1", "lot2", "Y", 2),
    ]
    specs.clear()
    assert len(cfg.slot_specs()) == 18


# ---- bad configs -----------------------------------------------------------------------------------


def _slots(group: str) -> str:
    return HEAD + f'[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "L1"\nslots = [{group}]\n'


BAD = [
    (
        "string for int",
        MINIMAL.replace("allow_anonymous = true", 'allow_anonymous = true\nport = "1883"'),
        "broker.port: Input should be a valid integer (got '1883')",
    ),
    (
        "string for bool",
        MINIMAL.replace("allow_anonymous = true", 'allow_anonymous = "yes"'),
        "broker.allow_anonymous: Input should be a valid boolean",
    ),
    ("ids of wrong type", _slots("{ ids = 5 }"), "lots[0].zones[0].slots[0].ids: expected a string"),
    ("unknown top-level key", "colour = 1\n" + MINIMAL, "colour: unknown key"),
    (
        "unknown nested key",
        MINIMAL.replace("allow_anonymous = true", "allow_anonymous = true\ncolour = 1"),
        "broker.colour: unknown key",
    ),
    ("unknown key in slot group", _slots('{ ids = "A1", kind = "ev" }'), "lots[0].zones[0].slots[0].kind: unknown key"),
    (
        "range end before start",
        _slots('{ ids = "A-10..A-01" }'),
        "lots[0].zones[0].slots[0].ids: range end before start",
    ),
    (
        "range prefix mismatch",
        _slots('{ ids = "A-01..B-10" }'),
        "lots[0].zones[0].slots[0].ids: range ends have different prefixes",
    ),
    (
        "range width mismatch",
        _slots('{ ids = "A-01..A-100" }'),
        "lots[0].zones[0].slots[0].ids: range ends have different digit widths",
    ),
    (
        "range not numeric",
        _slots('{ ids = "A-x..A-y" }'),
        "lots[0].zones[0].slots[0].ids: range ends must end in digits",
    ),
    ("range too large", _slots('{ ids = "A0..A100000" }'), "lots[0].zones[0].slots[0].ids: range of 100001"),
    ("bad slot id in list", _slots('{ ids = ["A1", "A 2"] }'), "lots[0].zones[0].slots[0].ids[1]: invalid slot id"),
    (
        "duplicate slot ids",
        _slots('{ ids = "A1..A5" }, { ids = "A5" }'),
        "lots[0].zones[0].slots[1].ids: duplicate slot id 'A5' (also lots[0].zones[0].slots[0])",
    ),
    (
        "duplicate sensor ids",
        _slots('{ ids = "A1", sensor = "s1" }, { ids = "A2", sensor = "s1" }'),
        "lots[0].zones[0].slots[1].sensor: duplicate sensor id 's1' (also lots[0].zones[0].slots[0].sensor)",
    ),
    (
        "sensor equal to another slot's default",
        _slots('{ ids = "A1..A3" }, { ids = "A4", sensor = "A2" }'),
        "lots[0].zones[0].slots[1].sensor: duplicate sensor id 'A2'",
    ),
    (
        "sensor on a range",
        _slots('{ ids = "A1..A3", sensor = "s1" }'),
        "lots[0].zones[0].slots[0].sensor: only allowed for a single slot, this group has 3",
    ),
    (
        "duplicate gate ids",
        MINIMAL + '[[gates]]\nid = "g"\nlot = "lot1"\ndirection = "entry"\n'
        '[[gates]]\nid = "g"\nlot = "lot1"\ndirection = "exit"\n',
        "gates[1].id: duplicate gate id 'g' (also gates[0])",
    ),
    (
        "dangling gate lot",
        MINIMAL + '[[gates]]\nid = "g1"\nlot = "lot1"\ndirection = "entry"\n'
        '[[gates]]\nid = "g2"\nlot = "lotX"\ndirection = "exit"\n',
        "gates[1].lot: unknown lot 'lotX'",
    ),
    (
        "camera on two gates",
        MINIMAL + '[[gates]]\nid = "g1"\nlot = "lot1"\ndirection = "entry"\ncamera = "c"\n'
        '[[gates]]\nid = "g2"\nlot = "lot1"\ndirection = "exit"\ncamera = "c"\n',
        "gates[1].camera: camera 'c' is also used by gates[0]",
    ),
    (
        "serial line twice",
        MINIMAL + '[[gates]]\nid = "g1"\nlot = "lot1"\ndirection = "entry"\nserial = { port = "/dev/x" }\n'
        '[[gates]]\nid = "g2"\nlot = "lot1"\ndirection = "exit"\nserial = { port = "/dev/x", address = 1 }\n',
        "gates[1].serial: port '/dev/x' address 1 is also used by gates[0]",
    ),
    (
        "tariff for unknown lot",
        MINIMAL + '[[tariffs]]\nlot = "nope"\ncurrency = "EUR"\nper_hour = 100\n',
        "tariffs[0].lot: unknown lot 'nope'",
    ),
    (
        "two tariffs for a lot",
        MINIMAL + '[[tariffs]]\nlot = "lot1"\ncurrency = "EUR"\nper_hour = 100\n'
        '[[tariffs]]\nlot = "lot1"\ncurrency = "EUR"\nper_hour = 200\n',
        "tariffs[1].lot: second tariff for lot 'lot1' (first at tariffs[0])",
    ),
    (
        "multipliers not increasing",
        MINIMAL + '[[tariffs]]\nlot = "lot1"\ncurrency = "EUR"\nper_hour = 1\n'
        "occupancy_multipliers = [{ from = 0.5, factor = 1.0 }, { from = 0.5, factor = 2.0 }]\n",
        "tariffs[0].occupancy_multipliers[1].from: must be greater than the previous 'from'",
    ),
    (
        "lowercase currency",
        MINIMAL + '[[tariffs]]\nlot = "lot1"\ncurrency = "eur"\nper_hour = 1\n',
        "tariffs[0].currency: String should match pattern",
    ),
    ("bad gateway id", MINIMAL.replace('id = "gw1"', 'id = "GW 1"'), "gateway.id: String should match pattern"),
    ("missing gateway", LOT, "gateway: required key is missing"),
    (
        "port out of range",
        MINIMAL.replace("allow_anonymous = true", "allow_anonymous = true\nport = 70000"),
        "broker.port: Input should be less than or equal to 65535 (got 70000)",
    ),
    (
        "password and password_file",
        MINIMAL + '[upstream]\nhost = "h"\npassword = "p"\npassword_file = "/f"\n',
        "upstream.password_file: set either password or password_file, not both",
    ),
    (
        "embedded broker open by accident",
        MINIMAL.replace("allow_anonymous = true", ""),
        "broker.users_file: required for the embedded broker unless allow_anonymous = true",
    ),
    (
        "acl_file on an external broker",
        MINIMAL.replace("allow_anonymous = true", 'embedded = false\nacl_file = "a"'),
        "broker.acl_file: only applies to the embedded broker",
    ),
    (
        "cert without key",
        MINIMAL + '[upstream]\nhost = "h"\ntls = { cert = "c.pem" }\n',
        "upstream.tls.key: cert and key go together",
    ),
    ("empty lots", "lots = []\n" + HEAD, "lots: List should have at least 1 item"),
    ("no lots", HEAD, "lots: required key is missing"),
    ("empty zones", HEAD + '[[lots]]\nid = "lot1"\nzones = []\n', "lots[0].zones: List should have at least 1 item"),
    (
        "duplicate lot ids",
        MINIMAL + LOT.replace("A-", "B-").replace("lora-1", "lora-2"),
        "lots[1].id: duplicate lot id 'lot1' (also lots[0])",
    ),
    (
        "duplicate zone ids",
        _slots('{ ids = "A1" }') + '[[lots.zones]]\nid = "L1"\nslots = [{ ids = "A2" }]\n',
        "lots[0].zones[1].id: duplicate zone id 'L1' (also lots[0].zones[0])",
    ),
    (
        "permit type nobody has",
        MINIMAL + '[access]\npermits = [{ vehicle = "AB1", types = ["ev", "vip"] }]\n',
        "access.permits[0].types[1]: no slot has type 'vip'",
    ),
    ("filter without +", MINIMAL + '[ingress]\nsensors = ["sensors/state"]\n', "ingress.sensors[0]: needs a '+' level"),
    (
        "# not last",
        MINIMAL + '[ingress]\ncameras = ["cameras/+/reads", "x/#/+"]\n',
        "ingress.cameras[1]: '#' is only allowed as the whole last level",
    ),
    (
        "negative duration",
        MINIMAL + "[timing]\npass_timeout = -1\n",
        "timing.pass_timeout: Input should be greater than 0",
    ),
    (
        "unknown policy",
        MINIMAL + '[policy]\nanti_passback = "medium"\n',
        "policy.anti_passback: Input should be 'hard' or 'soft' (got 'medium')",
    ),
    (
        "odd baud rate",
        MINIMAL + '[[gates]]\nid = "g"\nlot = "lot1"\ndirection = "entry"\n'
        'serial = { port = "/dev/x", baudrate = 9601 }\n',
        "gates[0].serial.baudrate: not a standard rate",
    ),
    (
        "small outbox",
        MINIMAL + '[upstream]\nhost = "h"\noutbox_max_bytes = 1000\n',
        "upstream.outbox_max_bytes: Input should be greater than or equal to 1048576",
    ),
    (
        "wildcard topic root",
        MINIMAL.replace('id = "gw1"', 'id = "gw1"\ntopic_root = "parking/#"'),
        "gateway.topic_root: String should match pattern",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config_names_the_field(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(line.startswith(expected) for line in errors), errors


def test_all_field_errors_are_reported() -> None:
    text = MINIMAL.replace('id = "gw1"', 'id = "GW"\ncolour = 1') + "[timing]\ndebounce = -1\nvacate_grace = 0\n"
    errors = errors_of(text)
    assert sorted(e.split(":")[0] for e in errors) == [
        "gateway.colour",
        "gateway.id",
        "timing.debounce",
        "timing.vacate_grace",
    ]


def test_all_cross_check_errors_are_reported() -> None:
    text = (
        _slots('{ ids = "A1..A9" }, { ids = "A3..A9" }, { ids = "B1", sensor = "A1" }')
        + '[[gates]]\nid = "g"\nlot = "x"\ndirection = "entry"\n'
        + '[[tariffs]]\nlot = "y"\ncurrency = "EUR"\nper_hour = 1\n'
    )
    assert errors_of(text) == [
        "lots[0].zones[0].slots[1].ids: duplicate slot ids 'A3', 'A4', 'A5', 'A6', 'A7' and 2 more "
        "(also lots[0].zones[0].slots[0])",
        "lots[0].zones[0].slots[2].sensor: duplicate sensor id 'A1' (also lots[0].zones[0].slots[0].ids)",
        "gates[0].lot: unknown lot 'x'",
        "tariffs[0].lot: unknown lot 'y'",
    ]


def test_duplicate_within_one_list() -> None:
    assert errors_of(_slots('{ ids = ["A1", "A2", "A1"] }')) == [
        "lots[0].zones[0].slots[0].ids: duplicate slot id 'A1' (listed twice in this group)"
    ]


def test_models_are_frozen() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.gateway.id = "other"


# ---- files -----------------------------------------------------------------------------------------


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[gateway]\nid = "gw1"\nstate_dir = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: invalid TOML at line 3, column 13: Invalid value"]


def test_invalid_toml_at_end_of_document() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("a = ", source="x.toml")
    assert info.value.errors == ["x.toml: invalid TOML: Invalid value (at end of document)"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.errors == [f"{tmp_path}: cannot read: Is a directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[gateway]\nid = "gar\xe7on"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors[0].startswith(f"{path}: cannot read: not UTF-8 text")


# ---- derived values and environment ----------------------------------------------------------------


def test_state_path_prefers_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(MINIMAL.replace('id = "gw1"', 'id = "gw1"\nstate_dir = "/srv/gw"'))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert cfg.state_path() == Path("/srv/gw")
    assert cfg.plate_key_path() == Path("/srv/gw/plate.key")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/parking-gateway")
    assert cfg.state_path() == Path("/var/lib/parking-gateway")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")
    assert cfg.state_path() == Path("/var/lib/a")
    monkeypatch.setenv("STATE_DIRECTORY", "")
    assert cfg.state_path() == Path("/srv/gw")


def test_default_state_dir_is_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert parse_config(MINIMAL).state_path() == Path("var")


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = tmp_path / "gateway.toml"
    monkeypatch.setattr(config_loading, "SYSTEM_CONFIG_PATH", system)
    monkeypatch.delenv("PARKING_GATEWAY_CONFIG", raising=False)
    assert default_config_path() == bundled_demo_path()
    system.write_text(MINIMAL)
    assert default_config_path() == system
    monkeypatch.setenv("PARKING_GATEWAY_CONFIG", "/somewhere/else.toml")
    assert default_config_path() == Path("/somewhere/else.toml")


def test_upstream_topic_root() -> None:
    assert parse_config(MINIMAL).upstream_topic_root() is None
    assert parse_config(MINIMAL + '[upstream]\nhost = "h"\n').upstream_topic_root() == "parking"
    with_root = parse_config(MINIMAL + '[upstream]\nhost = "h"\ntopic_root = "fleet/eu"\n')
    assert with_root.upstream_topic_root() == "fleet/eu"


def test_json_schema_uses_toml_key_names() -> None:
    schema = GatewayConfig.model_json_schema(by_alias=True)
    assert "from" in schema["$defs"]["OccupancyMultiplier"]["properties"]
