"""`[[tariffs]]`: a lot's prices."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from gateway.config.base import Loc, Problems, StrictModel


class OccupancyMultiplier(StrictModel):
    """From an occupancy fraction on, the hourly rate is multiplied by a factor."""

    from_: float = Field(alias="from", ge=0, le=1, description="Occupancy fraction 0..1 from which it applies.")
    factor: float = Field(gt=0, description="Multiplier of `per_hour`.")


class TariffConfig(StrictModel):
    """A lot's tariff; money is integer minor units (cents), never floats. A lot without one is free."""

    lot: str = Field(description="The lot this tariff applies to; one tariff per lot.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. `EUR`.")
    free_minutes: int = Field(0, ge=0, description="Minutes free of charge (the tariff rules say how they count).")
    per_hour: int = Field(ge=0, description="Price per hour, minor units.")
    daily_cap: int | None = Field(None, ge=0, description="Cap per day, minor units; unset: no cap.")
    exit_grace_minutes: int = Field(10, ge=0, description="Time to leave after payment.")
    occupancy_multipliers: list[OccupancyMultiplier] = Field(
        [],
        description="Surge pricing, by strictly increasing `from`; below the first one the factor is 1.",
    )

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        for i in range(1, len(self.occupancy_multipliers)):
            if self.occupancy_multipliers[i].from_ <= self.occupancy_multipliers[i - 1].from_:
                problems.append((("occupancy_multipliers", i, "from"), "must be greater than the previous 'from'"))
        if problems:
            raise Problems(problems)
        return self
