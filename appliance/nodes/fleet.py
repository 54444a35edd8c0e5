"""Many nodes at once: inventory parsing and a bounded fan-out of one agent request."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import UsageError
from appliance.nodes.client import Node, NodeAddress, NodeError, parse_address

DEFAULT_CONCURRENCY = 32


class InventoryError(UsageError):
    """The inventory file cannot be read or holds no hosts."""


@dataclass(frozen=True)
class HostEntry:
    name: str
    address: NodeAddress


@dataclass(frozen=True)
class HostOutcome:
    name: str
    ok: bool
    result: Any = None
    reason: str = ""
    code: str = ""  # the failure's stable code, as `--json` errors carry it


def entry_from_vars(name: str, variables: dict[str, Any]) -> HostEntry:
    """An Ansible-style host: ansible_host, ansible_port and ansible_user override the name."""
    base = parse_address(name)
    return HostEntry(
        name=name,
        address=NodeAddress(
            host=str(variables.get("ansible_host", base.host)),
            port=int(variables.get("ansible_port", base.port)),
            user=str(variables.get("ansible_user", base.user)),
        ),
    )


def parse_ini_inventory(text: str) -> list[HostEntry]:
    """Ansible INI: [group] headers, 'host key=value ...' lines; a plain host list works too."""
    entries: list[HostEntry] = []
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section.endswith(":vars") or section.endswith(":children"):
            continue
        name, *pairs = line.split()
        variables = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        entries.append(entry_from_vars(name, variables))
    return entries


def parse_yaml_inventory(data: Any) -> list[HostEntry]:
    """Ansible YAML: groups with 'hosts' maps (and 'children'), walked depth first."""
    entries: list[HostEntry] = []

    def walk(group: Any) -> None:
        if not isinstance(group, dict):
            return
        for name, variables in (group.get("hosts") or {}).items():
            entries.append(entry_from_vars(str(name), variables or {}))
        for child in (group.get("children") or {}).values():
            walk(child)

    if isinstance(data, list):
        return [entry_from_vars(str(name), {}) for name in data]
    if isinstance(data, dict):
        for group in data.values():
            walk(group)
    return entries


def load_inventory(path: Path) -> list[HostEntry]:
    try:
        text = path.read_text()
    except OSError as error:
        raise InventoryError(f"cannot read inventory {path}: {error.strerror}") from error
    try:
        if path.suffix in (".yml", ".yaml"):
            entries = parse_yaml_inventory(yaml.safe_load(text))
        else:
            entries = parse_ini_inventory(text)
    except (yaml.YAMLError, ValueError, NodeError) as error:
        raise InventoryError(f"inventory {path}: {error}") from error
    unique = list({entry.name: entry for entry in entries}.values())
    if not unique:
        raise InventoryError(f"inventory {path} names no hosts")
    return unique


def fan_out(
    entries: list[HostEntry],
    method: str,
    connect: Callable[[NodeAddress], Node],
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[HostOutcome]:
    """Ask every host the same read-only question, at most `concurrency` at a time."""

    def ask(entry: HostEntry) -> HostOutcome:
        try:
            with connect(entry.address) as node:
                return HostOutcome(entry.name, True, node.call(method, idempotent=True))
        except NodeError as error:
            return HostOutcome(entry.name, False, reason=str(error), code=error.code)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(ask, entries))
