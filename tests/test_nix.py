"""nixfleet.nix against real Nix (nix-bin 2.8 or newer): never mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load_file

from nixfleet import nix
from nixfleet.errors import CommandError, ValidationError

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix


fakes = load_file("nixfleet_test_fakes", Path(__file__).parent / "nix" / "fakes.py")


@pytest.fixture(autouse=True)
def _real_nix(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes.require_nix()
    monkeypatch.setenv("NIX_CONFIG", fakes.NIX_CONFIG)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Any]:
    c = fakes.BinaryCache(tmp_path)
    yield c
    c.close()


P = "/nix/store/" + "a" * 32 + "-x"
Q = "/nix/store/" + "b" * 32 + "-y"


def test_parse_path_info_both_shapes() -> None:
    old = [
        {
            "path": P,
            "narHash": "sha256-x",
            "narSize": 5,
            "references": [Q],
            "signatures": ["k:s"],
            "ultimate": True,
        },
        {"path": Q, "valid": False},
    ]
    new = {
        P: {
            "narHash": "sha256-x",
            "narSize": 5,
            "references": [Q],
            "signatures": ["k:s"],
            "ultimate": True,
        },
        Q: None,
    }
    for data in (old, new):
        a, b = nix.parse_path_info(data)
        assert (a.path, a.valid, a.nar_size, a.references, a.signatures) == (
            P,
            True,
            5,
            (Q,),
            ("k:s",),
        )
        assert (b.path, b.valid) == (Q, False)
    with pytest.raises(CommandError):
        nix.parse_path_info("nonsense")


def test_path_info_and_validity_on_the_real_store() -> None:
    path = fakes.build_system("pathinfo")
    (info,) = nix.path_info([path])
    assert info.valid and info.path == path and info.nar_hash and info.nar_size
    assert nix.is_valid(path)
    missing = "/nix/store/" + "0" * 32 + "-missing"
    assert not nix.is_valid(missing)
    (gone,) = nix.path_info([missing])
    assert not gone.valid


def test_closure_size_and_boot_links(cache: Any) -> None:
    path = fakes.build_system("closure-size", kernel="k9")
    size = nix.closure_size(path)
    assert size is not None and size >= (nix.path_info([path])[0].nar_size or 0)
    missing = "/nix/store/" + "0" * 32 + "-missing"
    assert nix.closure_size(missing) is None
    assert nix.closure_size(path, store=cache.url) is None  # not pushed yet
    cache.push(path)
    assert nix.closure_size(path, store=cache.url) == size
    links = nix.boot_links(path)
    assert links["kernel"] is not None and "linux-k9" in links["kernel"]
    assert nix.boot_links(fakes.build_system("closure-plain")) == dict.fromkeys(
        ("initrd", "kernel", "kernel-modules")
    )


def test_signed_copy_over_http_and_refusals(cache: Any, tmp_path: Path) -> None:
    good = fakes.build_system("copy-good")
    nix.sign([good], cache.secret_key)
    nix.copy_to(cache.file_url, [good])
    (remote,) = nix.path_info([good], store=cache.url)
    assert any(s.startswith("test-cache-1:") for s in remote.signatures)
    fakes.delete_from_store(good)
    nix.copy_from(cache.url, [good], trusted_public_keys=[cache.public_key])
    assert nix.is_valid(good)

    unsigned = fakes.build_system("copy-unsigned")
    cache.push(unsigned, sign=False)
    fakes.delete_from_store(unsigned)
    with pytest.raises(CommandError, match=fakes.UNTRUSTED):
        nix.copy_from(cache.url, [unsigned], trusted_public_keys=[cache.public_key])
    _, intruder_pk = fakes.other_key(tmp_path)
    good2 = fakes.build_system("copy-other-key")
    cache.push(good2)
    fakes.delete_from_store(good2)
    with pytest.raises(CommandError, match=fakes.UNTRUSTED):
        nix.copy_from(cache.url, [good2], trusted_public_keys=[intruder_pk])
    assert not nix.is_valid(unsigned) and not nix.is_valid(good2)


def test_realise(tmp_path: Path) -> None:
    path = fakes.build_system("realise")
    assert nix.realise([path]) == [path]
    with pytest.raises(CommandError):
        nix.realise(["/nix/store/" + "0" * 32 + "-nope"])


def test_profiles(tmp_path: Path) -> None:
    profile = tmp_path / "profiles" / "system"
    assert nix.list_generations(profile) == []
    a, b = fakes.build_system("gen-a"), fakes.build_system("gen-b")
    nix.profile_set(profile, a)
    nix.profile_set(profile, b)
    gens = nix.list_generations(profile)
    assert [(g.number, g.current, g.path) for g in gens] == [(1, False, a), (2, True, b)]
    nix.profile_rollback(profile)
    assert os.path.realpath(profile) == a
    assert [g.current for g in nix.list_generations(profile)] == [True, False]


def test_parse_generations_tolerates_noise(tmp_path: Path) -> None:
    text = "   1   2026-01-01 10:00:00   \n   2   2026-01-02 10:00:00   (current)\nwarning: x\n"
    gens = nix.parse_generations(text, tmp_path / "p")
    assert [(g.number, g.created, g.current, g.path) for g in gens] == [
        (1, "2026-01-01 10:00:00", False, None),
        (2, "2026-01-02 10:00:00", True, None),
    ]


def test_parse_build_output() -> None:
    assert nix.parse_build_output(f'[{{"drvPath": "/d", "outputs": {{"out": "{P}"}}}}]') == [P]
    assert nix.parse_build_output(f"{P}\n{Q}\n") == [P, Q]
    assert nix.parse_build_output("") == []


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    system = fakes.run(
        "nix", "eval", "--impure", "--raw", "--expr", "builtins.currentSystem"
    ).stdout.strip()
    d = tmp_path / "flake"
    d.mkdir()
    (d / "flake.nix").write_text(f'''{{
  outputs = {{ self }}: {{
    nixosConfigurations.web-01.config.system.build.toplevel = derivation {{
      name = "nixos-system-web-01-{fakes.RUN_ID}";
      system = "{system}";
      builder = "/bin/sh";
      args = [ "-c" "echo > $out" ];
    }};
    hosts = [ "web-01" ];
  }};
}}
''')
    return d


def test_eval_build_metadata_on_a_flake(flake: Path) -> None:
    ref = f"path:{flake}"
    assert nix.eval_json(f"{ref}#hosts") == ["web-01"]
    assert nix.eval_json(f"{ref}#nixosConfigurations", apply="builtins.attrNames") == ["web-01"]
    (out,) = nix.build([f"{ref}#nixosConfigurations.web-01.config.system.build.toplevel"])
    assert out.startswith("/nix/store/") and out.endswith(f"web-01-{fakes.RUN_ID}")
    assert nix.is_valid(out)
    meta = nix.flake_metadata(ref)
    assert "locked" in meta or "url" in meta
    with pytest.raises(CommandError):
        nix.eval_json(f"{ref}#nope")


def test_diff_closures_and_cache_key(tmp_path: Path) -> None:
    a, b = fakes.build_system("diff-a"), fakes.build_system("diff-b")
    # The two closures differ only in the system itself: one goes, the other comes.
    # (nix reads the run id as a version when it starts with a digit, else as the name)
    gone, came = sorted(nix.diff_closures(a, b).splitlines())
    assert gone.startswith("nixos-system-fake-diff-a") and gone.endswith(" → ∅")
    assert came.startswith("nixos-system-fake-diff-b") and ": ∅ → " in came
    assert nix.diff_closures(a, a) == ""
    pk = nix.generate_cache_key("k-1", tmp_path / "sk", tmp_path / "pk")
    assert pk.startswith("k-1:")


def test_command_timeout_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="timed out"):
        nix.eval_json("builtins.seq", options=None, timeout=0.001)


def test_paths_are_never_read_as_options() -> None:
    """A "path" such as --help never reaches a Nix command line as an option."""
    assert not nix.is_valid("--help")  # nix-store printed its manual and exited 0
    assert not nix.is_valid("--option")
    for call in (
        lambda: nix.realise(["--help"]),
        lambda: nix.path_info(["--store=/tmp/x"]),
        lambda: nix.copy_from("file:///tmp/c", ["--option", "x"]),
        lambda: nix.diff_closures("-a", "/nix/store/x"),
    ):
        with pytest.raises(ValidationError, match="not an absolute path"):
            call()
