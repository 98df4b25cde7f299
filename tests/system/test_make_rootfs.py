"""Which archive and which release the tier's root comes from (no root needed).

make-rootfs.sh takes the Debian archive from this machine's apt sources: the entry
that serves the machine's own release, whatever else is listed (security,
third-party archives, disabled stanzas). A Debian 13 machine lists deb822 stanzas
in /etc/apt/sources.list.d/debian.sources, a Debian 12 one often one-line entries;
both must give the archive that also serves the other release. The release of the
containers is the other one than the machine's, unless NIXFLEET_ROOTFS_SUITE says.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import nixfleet_test_container as container  # loaded by conftest
import pytest

SCRIPT = container.HERE / "make-rootfs.sh"
TRIXIE = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n'
BOOKWORM = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n'
DEBIAN_SOURCES = """\
    Types: deb deb-src
    URIs: http://ftp.de.debian.org/debian
    Suites: trixie trixie-updates
    Components: main non-free-firmware
    Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp

    Types: deb
    URIs: http://security.debian.org/debian-security
    Suites: trixie-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp
    """


def mirror(etc: Path, os_release: str, files: dict[str, str]) -> str:
    (etc / "apt" / "sources.list.d").mkdir(parents=True)
    (etc / "os-release").write_text(os_release)
    for name, text in files.items():
        (etc / "apt" / name).write_text(textwrap.dedent(text))
    done = subprocess.run(
        [str(SCRIPT), "--mirror"],
        capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "NIXFLEET_HOST_ETC": str(etc)},
    )  # fmt: skip
    return done.stdout.strip()


def test_a_debian_13_machine_with_the_installer_s_deb822_sources(tmp_path: Path) -> None:
    assert mirror(tmp_path, TRIXIE, {"sources.list.d/debian.sources": DEBIAN_SOURCES}) == (
        "http://ftp.de.debian.org/debian"
    )


def test_third_party_and_disabled_stanzas_listed_first_are_not_the_archive(
    tmp_path: Path,
) -> None:
    files = {
        "sources.list.d/caddy.sources": """\
            Types: deb
            URIs: https://dl.cloudsmith.io/public/caddy/stable/deb/debian
            Suites: any-version
            Components: main
            """,
        "sources.list.d/aaa-old.sources": """\
            Enabled: no
            Types: deb
            URIs: http://old.example.org/debian
            Suites: trixie
            Components: main
            """,
        "sources.list.d/debian.sources": DEBIAN_SOURCES,
    }
    assert mirror(tmp_path, TRIXIE, files) == "http://ftp.de.debian.org/debian"


def test_a_snapshot_archive_with_comments_is_kept(tmp_path: Path) -> None:
    sources = """\
        Types: deb
        # http://snapshot.debian.org/archive/debian/20250520T000000Z
        URIs: http://snapshot.debian.org/archive/debian/20250520T000000Z
        Suites: bookworm bookworm-updates
        Components: main
        """
    got = mirror(tmp_path, BOOKWORM, {"sources.list.d/debian.sources": sources})
    assert got == "http://snapshot.debian.org/archive/debian/20250520T000000Z"


def test_one_line_entries_with_options(tmp_path: Path) -> None:
    files = {
        "sources.list": """\
            deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
            deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example.net/debian bookworm main contrib
            deb http://security.debian.org/debian-security bookworm-security main
            """,
    }
    assert mirror(tmp_path, BOOKWORM, files) == "http://mirror.example.net/debian"


def test_nothing_serving_this_release_gives_deb_debian_org(tmp_path: Path) -> None:
    files = {"sources.list": "deb http://archive.ubuntu.com/ubuntu noble main\n"}
    got = mirror(
        tmp_path, "NAME=Ubuntu\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n", files
    )
    assert got == "http://deb.debian.org/debian"


@pytest.mark.parametrize(
    ("host", "forced", "suite"),
    [("bookworm", "", "trixie"), ("trixie", "", "bookworm"), ("noble", "", "trixie"),
     ("", "", "trixie"), ("bookworm", "bookworm", "bookworm"), ("trixie", "trixie", "trixie")],
)  # fmt: skip
def test_the_containers_are_of_the_other_release_unless_forced(
    monkeypatch: pytest.MonkeyPatch, host: str, forced: str, suite: str
) -> None:
    monkeypatch.setattr(container, "host_release", lambda: host)
    monkeypatch.setenv(container.SUITE_VAR, forced)
    assert container.container_suite() == suite


def test_a_forced_release_that_is_no_suite_name_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(container.SUITE_VAR, "../etc")
    with pytest.raises(pytest.fail.Exception, match="not a Debian suite name"):
        container.container_suite()


def test_this_machine_s_release_is_read_from_os_release() -> None:
    text = Path("/etc/os-release").read_text()
    assert container.host_release() in text
