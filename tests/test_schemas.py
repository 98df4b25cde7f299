"""The compiled fast check never accepts what jsonschema refuses.

schemas.validate answers "valid" from a plain-Python predicate compiled from each
schema, and asks jsonschema only when that predicate is not certain. A bug there
would let invalid input into the store silently, so here both judge thousands of
near-valid documents (valid examples with one part replaced by arbitrary JSON,
removed, or an unknown key added) and must never disagree in that direction.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from nixfleet import schemas

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
VALID: dict[str, dict[str, Any]] = {
    "report": {
        "current_generation": GEN,
        "tags": ["prod", "web"],
        "success": False,
        "message": "rolled back: health check failed",
        "attempted_generation": GEN,
        "health": {
            "all_passed": False,
            "results": [
                {
                    "name": "nginx",
                    "kind": "systemd",
                    "passed": False,
                    "duration_ms": 12,
                    "message": "x",
                }
            ],
        },
        "agent_version": "0.1.0",
        "uptime_seconds": 12,
    },
    "machine-register": {
        "id": "web-01",
        "tags": ["prod"],
        "lifecycle": "pending",
        "issue_token": True,
    },
    "machine-lifecycle": {"lifecycle": "maintenance"},
    "machine-tags": {"tags": ["canary", "eu"]},
    "desired-generation": {"store_path": GEN, "cache_url": "https://cache.example.com"},
    "key-create": {"name": "ci", "role": "deploy"},
    "enroll-token-create": {
        "uses": 3,
        "expires_in_seconds": 3600,
        "tags": ["prod"],
        "hostname_glob": "web-*",
    },
    "enroll": {"enroll_token": "nfe_" + "x" * 43, "machine_id": "web-01", "tags": ["prod"]},
}

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", GEN, "web-01", "prod", "pending", "https://x.example", "-x", "a b"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def near_valid(draw: st.DrawFn, name: str) -> Any:
    doc = copy.deepcopy(VALID[name])
    path = draw(st.sampled_from(paths(doc)))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return draw(JSON) if action == "replace" else doc
    parent: Any = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = draw(JSON)
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON)
    else:
        parent.append(draw(JSON))
    return doc


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_take_the_fast_path(name: str) -> None:
    fast = schemas.fast_check(name)
    assert fast is not None and fast(VALID[name])
    assert schemas.validator(name).is_valid(VALID[name])


@pytest.mark.parametrize("name", sorted(VALID))
@seed(20261127)
@settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_fast_check_never_accepts_what_jsonschema_refuses(name: str, data: st.DataObject) -> None:
    doc = data.draw(near_valid(name))
    fast = schemas.fast_check(name)
    assert fast is not None
    if fast(doc):
        assert schemas.validator(name).is_valid(doc), doc
