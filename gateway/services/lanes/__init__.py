"""Barrier lanes over GCP/1: `Lanes` (the service) and `Lane` (one gate); decisions are in gateway/core/lanes.py."""

from gateway.services.lanes.lane import Lane
from gateway.services.lanes.service import Lanes

__all__ = ["Lane", "Lanes"]
