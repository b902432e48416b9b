"""`[access]`: deny list, permits, restricted types."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import Plate, StrictModel, TypeWord


class Permit(StrictModel):
    """A vehicle allowed to use restricted slot types."""

    vehicle: Plate = Field(description="Plate (or ticket) of the vehicle.")
    types: list[TypeWord] = Field(min_length=1, description="Slot types it may use; each must exist in a lot.")


class AccessConfig(StrictModel):
    """Local access lists; upstream can replace them later."""

    deny: list[Plate] = Field([], description="Plates refused at entry (`entry.denied`, reason `denied`).")
    permits: list[Permit] = Field([], description="Vehicles allowed to use restricted types.")
    restricted_types: list[TypeWord] = Field(
        ["accessible", "ev"], description="Slot types given only to permit holders or an explicit request."
    )
