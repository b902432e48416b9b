"""The configuration file (contract §2): one pydantic model per TOML table on a shared strict base.

`model.GatewayConfig` holds the tables and the cross-checks between them; `loading` reads a file and
turns every validation error into one line named by its field path; `reference` writes the key reference.
"""

from gateway.config.base import ConfigError
from gateway.config.gates import GateConfig
from gateway.config.ingress import IngressKind
from gateway.config.loading import bundled_demo_path, default_config_path, load_config, parse_config
from gateway.config.lots import SlotSpec, expand_slot_ids
from gateway.config.model import GatewayConfig
from gateway.config.reference import config_reference_markdown
from gateway.config.tariffs import TariffConfig

__all__ = [
    "ConfigError",
    "GateConfig",
    "GatewayConfig",
    "IngressKind",
    "SlotSpec",
    "TariffConfig",
    "bundled_demo_path",
    "config_reference_markdown",
    "default_config_path",
    "expand_slot_ids",
    "load_config",
    "parse_config",
]
