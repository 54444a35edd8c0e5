"""Request round-trips to an agent: many requests on one open channel, and connect-plus-first-request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from figures import Section, median_text, percentile, seconds, summary

from appliance.nodes.client import Node

METHOD = "agent.hello"


@dataclass
class RoundTrips:
    """Samples in seconds, gathered against one kind of endpoint (pooled over boots for a node)."""

    label: str
    open_channel: list[float] = field(default_factory=list)
    connect_first: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"label": self.label, "method": METHOD}
        if self.open_channel:
            data["open_channel"] = {
                **summary(self.open_channel),
                "p50": percentile(self.open_channel, 0.5),
                "p95": percentile(self.open_channel, 0.95),
            }
        if self.connect_first:
            data["connect_first"] = summary(self.connect_first)
        return data

    def add_rows(self, section: Section) -> None:
        if self.open_channel:
            p50, p95 = percentile(self.open_channel, 0.5), percentile(self.open_channel, 0.95)
            section.add(
                f"round-trip on an open channel, {self.label}",
                f"p50 {seconds(p50)}, p95 {seconds(p95)}",
                f"{len(self.open_channel)} x {METHOD}",
            )
        if self.connect_first:
            section.add(f"connect + first request, {self.label}", median_text(self.connect_first), "median")


def time_call(call: Callable[[str], object]) -> float:
    started = time.perf_counter()
    call(METHOD)
    return time.perf_counter() - started


def open_channel_samples(call: Callable[[str], object], count: int) -> list[float]:
    """`count` requests one after another on a channel that is already open (one untimed first)."""
    call(METHOD)
    return [time_call(call) for _ in range(count)]


def connect_first_samples(make_node: Callable[[], Node], count: int) -> list[float]:
    """A new SSH connection (TCP, key exchange, auth, channel, agent start) plus its first request."""
    samples: list[float] = []
    for _ in range(count):
        node = make_node()
        started = time.perf_counter()
        try:
            node.connect()
            node.call(METHOD)
            samples.append(time.perf_counter() - started)
        finally:
            node.close()
    return samples
