from __future__ import annotations

from pathlib import Path

from appliance.build.mirrors import (
    AptSource,
    choose_mirrors,
    parse_deb822_sources,
    parse_one_line_sources,
    read_host_sources,
)

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
"""


def test_deb822_sources_are_read() -> None:
    assert parse_deb822_sources(DEB822) == [
        AptSource("http://mirror.example/debian", "bookworm"),
        AptSource("http://mirror.example/debian", "bookworm-updates"),
        AptSource("http://mirror.example/debian-security", "bookworm-security"),
    ]


def test_one_line_sources_are_read_with_options() -> None:
    text = (
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
        "deb-src http://x/debian bookworm main\n"
    )
    assert parse_one_line_sources(text) == [AptSource("http://m.example/debian", "bookworm")]


def test_security_mirror_is_taken_from_the_host_when_present() -> None:
    mirrors = choose_mirrors(parse_deb822_sources(DEB822))
    assert mirrors.debian == "http://mirror.example/debian"
    assert mirrors.security == "http://mirror.example/debian-security"


def test_security_mirror_is_derived_from_the_main_mirror_otherwise() -> None:
    mirrors = choose_mirrors([AptSource("http://proxy.local:3142/debian", "bookworm")])
    assert mirrors.security == "http://proxy.local:3142/debian-security"


def test_no_sources_fall_back_to_the_debian_cdn() -> None:
    assert choose_mirrors([]).debian == "http://deb.debian.org/debian"


def test_host_files_are_combined(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://a.example/debian bookworm main\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.sources").write_text(DEB822)
    (tmp_path / "d" / "ignored.txt").write_text("deb http://ignored/debian bookworm main\n")
    found = read_host_sources(tmp_path / "sources.list", tmp_path / "d")
    assert found[0] == AptSource("http://a.example/debian", "bookworm")
    assert len(found) == 4
