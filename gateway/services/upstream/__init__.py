"""Upstream sync (contract §7): the outbox forwarder and the upstream broker connection it runs on."""

from gateway.services.upstream.forwarder import Forwarder
from gateway.services.upstream.service import Tuning, Upstream

__all__ = ["Forwarder", "Tuning", "Upstream"]
