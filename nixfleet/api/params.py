"""Query-string parameters of the API that are integers: one parser, one 422.

Every integer parameter (`limit`, `after`, …) is an IntParam: its range and default
are declared once, and the same declaration reads the request and documents the
parameter in the OpenAPI document (`schema` with `minimum`/`maximum`). A value that
is not a plain decimal integer in the range — `x`, `-1`, `1.5`, ` 7`, `0` where 1 is
the least, a number past the maximum, the parameter given twice with different
values — is a 422 problem naming the parameter and the range (DESIGN §4, §9), never
falcon's 400 and never a 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass

import falcon

from nixfleet.errors import FieldError, ValidationError
from nixfleet.wire import OpenAPIParameter

# More digits than any range here allows: refused before int() sees them.
_MAX_DIGITS = 19


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    default: int
    description: str  # what it means; the range and default are added

    def allowed(self) -> str:
        return f"an integer from {self.low} to {self.high}"

    def read(self, req: falcon.Request) -> int:
        """The parameter's value, its default when absent, else a 422 naming it."""
        values = req.get_param_as_list(self.name)
        if not values:
            return self.default
        value = values[0]
        if (
            any(v != value for v in values)
            or not (value.isascii() and value.isdigit())
            or len(value) > _MAX_DIGITS
            or not self.low <= int(value) <= self.high
        ):
            shown = value if len(set(values)) == 1 else ",".join(values)
            raise ValidationError(
                f"invalid {self.name} {shown[:40]!r}: {self.allowed()}",
                errors=[FieldError(self.name, self.allowed())],
            )
        return int(value)

    def openapi(self) -> OpenAPIParameter:
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "schema": {
                "type": "integer",
                "minimum": self.low,
                "maximum": self.high,
                "default": self.default,
            },
            "description": f"{self.description}; {self.allowed()} (default {self.default})",
        }


def limit(high: int, default: int = 100, what: str = "entries") -> IntParam:
    """The usual `limit`: how many to return, 1 to `high`."""
    return IntParam("limit", 1, high, default, f"{what} to return at most")
