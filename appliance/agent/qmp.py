"""A small QMP client on the standard library: greeting, capabilities, commands, events.

It knows QMP and nothing about guests. One client per QEMU monitor socket;
not thread-safe (the agent serves one connection per process).
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class QMPError(Exception):
    """Base of every QMP failure."""


class ConnectError(QMPError):
    """The monitor socket could not be reached or did not greet us as QMP."""


class ExecuteError(QMPError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class ConnectionLostError(QMPError):
    """QEMU closed the monitor or went silent past the deadline."""


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    timestamp: float


@dataclass
class QMPClient:
    socket_path: Path
    timeout: float = 10.0
    version: dict[str, Any] = field(default_factory=dict)
    _sock: socket.socket | None = None
    _buffer: bytes = b""
    _events: deque[Event] = field(default_factory=deque)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as error:
            sock.close()
            raise ConnectError(f"cannot connect to {self.socket_path}: {error.strerror}") from error
        self._sock = sock
        greeting = self._read_message()
        if "QMP" not in greeting:
            self.close()
            raise ConnectError(f"{self.socket_path} did not greet with QMP: {greeting}")
        self.version = greeting["QMP"].get("version", {})
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QMPClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its result; events seen meanwhile are kept."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        while True:
            reply = self._read_message()
            if "event" in reply:
                self._keep_event(reply)
            elif "return" in reply:
                return reply["return"]
            elif "error" in reply:
                error = reply["error"]
                raise ExecuteError(command, error.get("class", "GenericError"), error.get("desc", ""))

    def wait_event(self, name: str, timeout: float) -> Event:
        """The next event called `name` (from those already seen first)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in list(self._events):
                if event.name == name:
                    self._events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLostError(f"no {name} event within {timeout:.0f}s")
            message = self._read_message(remaining)
            if "event" in message:
                self._keep_event(message)

    def _keep_event(self, message: dict[str, Any]) -> None:
        stamp = message.get("timestamp", {})
        when = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        self._events.append(Event(message["event"], message.get("data", {}), when))

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise ConnectionLostError("not connected")
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as error:
            raise ConnectionLostError(f"sending to QEMU failed: {error}") from error

    def _read_message(self, timeout: float | None = None) -> dict[str, Any]:
        if self._sock is None:
            raise ConnectionLostError("not connected")
        self._sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as error:
                raise ConnectionLostError("QEMU did not answer in time") from error
            except OSError as error:
                raise ConnectionLostError(f"reading from QEMU failed: {error}") from error
            if not chunk:
                raise ConnectionLostError("QEMU closed the monitor")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError as error:
            raise ConnectionLostError(f"QEMU sent something that is not JSON: {line[:100]!r}") from error
        return message
