"""Many nodes at once: a bounded fan-out of one agent request (the inventory is read by inventory.py)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from appliance.nodes.client import Node, NodeAddress
from appliance.nodes.errors import NodeError
from appliance.nodes.inventory import HostEntry

DEFAULT_CONCURRENCY = 32


@dataclass(frozen=True)
class HostOutcome:
    name: str
    ok: bool
    result: Any = None
    reason: str = ""
    code: str = ""  # the failure's stable code, as `--json` errors carry it


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
