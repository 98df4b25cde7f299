"""Pure domain rules: the lifecycle table of DESIGN §3 exactly, and identifier validation."""

from __future__ import annotations

import itertools

import pytest

from nixfleet.errors import ConflictError, ValidationError
from nixfleet.models import (
    Lifecycle,
    Machine,
    Sync,
    check_transition,
    utcnow,
    validate_hostname,
    validate_store_path,
)

L = Lifecycle
ALLOWED = {
    (L.PENDING, L.PROVISIONING),
    (L.PENDING, L.ACTIVE),
    (L.PENDING, L.DECOMMISSIONED),
    (L.PROVISIONING, L.PENDING),
    (L.PROVISIONING, L.ACTIVE),
    (L.ACTIVE, L.MAINTENANCE),
    (L.MAINTENANCE, L.ACTIVE),
    (L.ACTIVE, L.DECOMMISSIONED),
    (L.MAINTENANCE, L.DECOMMISSIONED),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(L, L)))
def test_every_transition_of_the_5x5_table(current: Lifecycle, target: Lifecycle) -> None:
    if (current, target) in ALLOWED:
        check_transition("web-01", current, target)
        return
    with pytest.raises(ConflictError) as e:
        check_transition("web-01", current, target)
    message = str(e.value)
    assert f"from {current} to {target}" in message
    assert "allowed from" in message


def test_refusal_names_the_allowed_targets() -> None:
    with pytest.raises(ConflictError, match="allowed from active: decommissioned, maintenance"):
        check_transition("web-01", L.ACTIVE, L.PENDING)
    with pytest.raises(ConflictError, match="decommissioned is final"):
        check_transition("web-01", L.DECOMMISSIONED, L.ACTIVE)


@pytest.mark.parametrize("name", ["web-01", "a", "db.eu-1.example.com", "x_y", "A" * 128])
def test_valid_hostnames(name: str) -> None:
    assert validate_hostname(name) == name


@pytest.mark.parametrize(
    "name", ["", "-web", ".hidden", "../etc", "web/01", "web 01", "A" * 129, "web\x00", "wéb"]
)
def test_invalid_hostnames_name_the_field(name: str) -> None:
    with pytest.raises(ValidationError) as e:
        validate_hostname(name)
    assert e.value.errors[0].field == "id"


GOOD_PATH = "/nix/store/" + "a" * 32 + "-nixos-system-web-01-24.11"


def test_store_paths() -> None:
    assert validate_store_path(GOOD_PATH) == GOOD_PATH
    for bad in ["/nix/store/short-x", GOOD_PATH + "/bin", "/tmp/" + "a" * 32 + "-x", "A" * 44]:
        with pytest.raises(ValidationError):
            validate_store_path(bad)


@pytest.mark.parametrize(
    ("current", "desired", "failed", "expected"),
    [
        (GOOD_PATH, None, None, Sync.NO_DESIRED),
        (GOOD_PATH, GOOD_PATH, None, Sync.IN_SYNC),
        (None, GOOD_PATH, None, Sync.UPDATING),
        ("/nix/store/" + "b" * 32 + "-old", GOOD_PATH, GOOD_PATH, Sync.FAILED),
        (
            "/nix/store/" + "b" * 32 + "-old",
            GOOD_PATH,
            "/nix/store/" + "c" * 32 + "-x",
            Sync.UPDATING,
        ),
    ],
)
def test_sync(current: str | None, desired: str | None, failed: str | None, expected: Sync) -> None:
    m = Machine(
        id="web-01",
        lifecycle=L.ACTIVE,
        registered_at=utcnow(),
        current_generation=current,
        desired_generation=desired,
        failed_generation=failed,
    )
    assert m.sync is expected


def test_the_schemas_state_the_release_id_format_of_models() -> None:
    """The release-id format lives in models; the JSON Schemas say it again for clients."""
    from nixfleet import schemas
    from nixfleet.flake import release_id
    from nixfleet.models import RELEASE_ID_RE, ReleaseEntry, is_release_id

    release = schemas.load("release")["properties"]["id"]["pattern"]
    rollout = schemas.load("rollout")["properties"]["release"]["pattern"]
    assert release == RELEASE_ID_RE.pattern
    assert rollout.startswith("^(" + RELEASE_ID_RE.pattern.strip("^$") + "|")
    made = release_id([ReleaseEntry("h", "/nix/store/" + "a" * 32 + "-x", "x86_64-linux")])
    assert is_release_id(made)
