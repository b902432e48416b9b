"""`[policy]`: decisions at the gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.config.base import StrictModel


class PolicyConfig(StrictModel):
    """Decisions at the gates."""

    anti_passback: Literal["hard", "soft"] = Field(
        "hard",
        description="`hard`: a vehicle with an active session is refused (`already_active`); `soft`: the "
        "existing session is returned and an alert raised.",
    )
    exit_unpaid: Literal["deny", "bill_later"] = Field(
        "deny",
        description="An exit with something due (fee less payments; nothing within `paid_until`): `deny`: refused"
        " `payment_required` with `due` and `currency`, the barrier stays closed and the session active; `bill_later`:"
        " the exit opens and `payment.requested` carries what is unpaid.",
    )
