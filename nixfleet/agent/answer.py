"""What the control plane answers an agent, checked before anything uses it (DESIGN §5).

The agent trusts nothing in the answer: a desired generation must be a store path
before it reaches a Nix command line, a cache URL must use https:// or http:// (or a
scheme the machine's own config allows, such as file:// in tests), a poll hint is
clamped to [1 s, poll interval] (NaN, Infinity or 1e9 cannot make it sleep for years
or crash), a confirm window must be a positive number of seconds (clamped to
[1 s, the agent config's own maximum]: the rollout's window is bounded as the agent's
is), and a body that is not the documented object is an error of this cycle.
The retry request is kept as the CP's own string: the agent compares it only with
values it saw before, never with its own clock (the two clocks may disagree).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nixfleet import schemas
from nixfleet.agent.config import AgentConfig
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import STORE_PATH_RE

MIN_POLL = 1.0
MIN_CONFIRM = 1.0
DEFAULT_CACHE_SCHEMES = ("https", "http")
MAX_URL = 2048
MAX_STORE_PATH = 400
MAX_TOKEN = 64


@dataclass(frozen=True)
class Answer:
    """A validated report (or desired-generation) answer."""

    generation: str | None
    cache_url: str | None
    poll_hint: float | None
    retry_requested_at: str | None  # opaque: compared for equality only
    confirm_timeout: float | None = None  # the rollout's (agent.confirm); None: the agent's
    reboot: bool = False  # the machine's rollout reboots it when needed (DESIGN §11)


def parse(data: Any, config: AgentConfig) -> Answer:
    """The answer as a typed value; ValidationError naming every bad field."""
    if not isinstance(data, Mapping):
        raise ValidationError(
            f"the control plane's answer is not a JSON object but {type(data).__name__}",
            errors=[FieldError("(document)", "expected an object with desired_generation")],
        )
    errors: list[FieldError] = []
    generation = _generation(data.get("desired_generation"), errors)
    cache_url = _cache_url(data.get("cache_url"), config, errors)
    retry = data.get("retry_requested_at")
    if retry is not None and not (isinstance(retry, str) and 0 < len(retry) <= MAX_TOKEN):
        errors.append(FieldError("retry_requested_at", "must be null or a short string"))
        retry = None
    confirm = confirm_window(data.get("confirm_timeout"), errors)
    if errors:
        raise ValidationError("the control plane's answer is invalid; ignoring it", errors=errors)
    return Answer(
        generation,
        cache_url,
        clamp_poll_hint(data.get("poll_hint"), config),
        retry,
        confirm,
        data.get("reboot") == "when-needed",
    )


def max_confirm() -> float:
    """The longest confirm window: the agent config schema's bound, named there once."""
    bound = schemas.load("agent-config")["properties"]["confirm_timeout"]["maximum"]
    return float(bound)


def confirm_window(value: Any, errors: list[FieldError]) -> float | None:
    """The rollout's confirm window in seconds, within [1 s, max_confirm()]; None: none.

    Not a positive finite number (a string, true, NaN, Infinity, 0, -5): an error of the
    field, so the answer is ignored rather than its window silently dropped.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        errors.append(
            FieldError(
                "confirm_timeout", f"{str(value)[:40]!r} is not a positive number of seconds"
            )
        )
        return None
    return min(max(float(value), MIN_CONFIRM), max_confirm())


def clamp_poll_hint(hint: Any, config: AgentConfig) -> float | None:
    """A hint within [1 s, poll interval]; None (use the interval) if it is no number."""
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return None
    value = float(hint)
    if math.isnan(value):
        return None
    return max(MIN_POLL, min(value, config.poll_interval))


def _generation(value: Any, errors: list[FieldError]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_STORE_PATH or not STORE_PATH_RE.match(value):
        errors.append(
            FieldError(
                "desired_generation",
                f"{str(value)[:100]!r} is not a Nix store path; not passing it to nix",
            )
        )
        return None
    return value


def allowed_schemes(config: AgentConfig) -> tuple[str, ...]:
    return DEFAULT_CACHE_SCHEMES + tuple(config.allowed_cache_schemes)


def _cache_url(value: Any, config: AgentConfig, errors: list[FieldError]) -> str | None:
    if value is None:
        return None
    allowed = allowed_schemes(config)
    if not isinstance(value, str) or len(value) > MAX_URL or any(c.isspace() for c in value):
        errors.append(FieldError("cache_url", "must be null or a URL without spaces"))
        return None
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme not in allowed:
        errors.append(
            FieldError(
                "cache_url",
                f"scheme {scheme or '(none)'!r} is not allowed (allowed: {', '.join(allowed)}); "
                "a machine allows more with allowed_cache_schemes in its agent config",
            )
        )
        return None
    return value
