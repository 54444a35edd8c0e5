"""Which Debian mirrors the build host's apt uses, so the image builds from the same."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
FALLBACK_DEBIAN = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str


@dataclass(frozen=True)
class HostMirrors:
    debian: str
    security: str


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Entries of a classic sources.list ('deb [options] URI SUITE COMPONENTS')."""
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or fields[0] != "deb":
            continue
        rest = fields[1:]
        if rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            found.append(AptSource(uri=rest[0].rstrip("/"), suite=rest[1]))
    return found


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Entries of a deb822 .sources file (stanzas of 'Types:', 'URIs:', 'Suites:')."""
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                found.append(AptSource(uri=uri.rstrip("/"), suite=suite))
    return found


def read_host_sources(sources_list: Path = APT_SOURCES_LIST, sources_dir: Path = APT_SOURCES_DIR) -> list[AptSource]:
    found = []
    if sources_list.is_file():
        found += parse_one_line_sources(sources_list.read_text())
    if sources_dir.is_dir():
        for path in sorted(sources_dir.iterdir()):
            if path.suffix == ".list":
                found += parse_one_line_sources(path.read_text())
            elif path.suffix == ".sources":
                found += parse_deb822_sources(path.read_text())
    return found


def choose_mirrors(sources: list[AptSource]) -> HostMirrors:
    """The main and security mirrors among the host's sources.

    The security mirror is the host's own '-security' source when it has one,
    else the main mirror's sibling 'debian-security' path (the usual layout).
    """
    main = next((s.uri for s in sources if "-security" not in s.suite and "security" not in s.uri), FALLBACK_DEBIAN)
    security = next((s.uri for s in sources if s.suite.endswith("-security")), "")
    if not security:
        base = main[: -len("/debian")] if main.endswith("/debian") else main
        security = base + "/debian-security"
    return HostMirrors(debian=main, security=security)


def host_mirrors() -> HostMirrors:
    return choose_mirrors(read_host_sources())
