"""Reading raw bytes with a deadline: what a relay (an attached console, a display) or a terminal sends."""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any

from helpers.agent_process import AgentProcess


def read_until(fd: int, needle: bytes, timeout: float, seen: bytes = b"") -> bytes:
    """Everything read from `fd` (after `seen`) up to and including the first `needle`; fails at the
    deadline or when the other side closes first, showing what came."""
    data = seen
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {needle!r} within {timeout:.0f}s; got {data[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty whose other side closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"closed before {needle!r}; got {data[-2000:]!r}")
        data += chunk
    return data


def read_to_end(fd: int, timeout: float) -> bytes:
    """What `fd` gives until its other side closes (fails at the deadline)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout:.0f}s; got {data[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def attach(agent: AgentProcess, method: str, params: dict[str, Any], timeout: float = 30) -> tuple[Any, bytes]:
    """A relay request to the agent over its pipes: its reply, and the raw bytes that came after it
    (read from the pipe itself, so nothing of the relay is left in a line reader's buffer)."""
    assert agent.process.stdin is not None and agent.process.stdout is not None
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    agent.process.stdin.write(json.dumps(message).encode() + b"\n")
    agent.process.stdin.flush()
    data = read_until(agent.process.stdout.fileno(), b"\n", timeout)
    line, rest = data.split(b"\n", 1)
    return json.loads(line), rest


def send_raw(agent: AgentProcess, data: bytes) -> None:
    assert agent.process.stdin is not None
    agent.process.stdin.write(data)
    agent.process.stdin.flush()
