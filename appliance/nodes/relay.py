"""The operator's side of a guest's consoles: the serial console on this terminal, the display on a
local TCP port, each relayed through the SSH connection to the node's agent.

The serial console is `virsh console`'s: the terminal in raw mode (every key,
Ctrl-C included, goes to the guest) until the escape key, Ctrl-], and put back
as it was however the session ends. The display listens on 127.0.0.1 only;
each connection a VNC viewer makes gets a channel of its own on the same SSH
connection (the node's sshd forwards nothing: the agent relays).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol

from appliance.nodes.client import Node, Relay
from appliance.nodes.errors import AgentCallError, ConnectionLostError, NodeError

ESCAPE = b"\x1d"  # Ctrl-], as virsh console and telnet
ESCAPE_NAME = "^]"
CHUNK = 64 * 1024
LOCAL_HOST = "127.0.0.1"


class Pipe(Protocol):
    """What a relay moves bytes between: a socket, or a paramiko channel."""

    def fileno(self) -> int: ...
    def recv(self, size: int, /) -> bytes: ...
    def sendall(self, data: bytes, /) -> None: ...
    def close(self) -> None: ...


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal on `fd` in raw mode for the block, restored after it on every way out: an error,
    the escape key, the guest going, SIGTERM or SIGHUP (turned into SystemExit so the restore runs)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, leave) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def console_session(relay: Relay, stdin: int, stdout: int, escape: bytes = ESCAPE) -> str:
    """Relay the terminal to the attached console until the escape key ("escape"), the end of input
    ("end of input") or the console closing: the guest stopped, or the agent went ("closed")."""
    channel = relay.channel
    write_all(stdout, relay.early)
    try:
        while True:
            ready, _, _ = select.select([stdin, channel.fileno()], [], [])
            if channel.fileno() in ready:
                data = channel.recv(CHUNK)
                if not data:
                    return "closed"
                write_all(stdout, data)
            if stdin in ready:
                data = os.read(stdin, CHUNK)
                if not data:
                    return "end of input"
                if escape in data:
                    channel.sendall(data[: data.index(escape)])
                    return "escape"
                channel.sendall(data)
    except OSError as error:
        raise ConnectionLostError(f"the console's connection broke: {error}") from error
    finally:
        channel.close()


def pump(one: Pipe, other: Pipe) -> None:
    """Bytes both ways between two connections until either closes; then both are closed."""
    try:
        while True:
            ready, _, _ = select.select([one, other], [], [])
            for source in ready:
                data = source.recv(CHUNK)
                if not data:
                    return
                (other if source is one else one).sendall(data)
    except OSError:
        return  # a connection reset ends this relay only
    finally:
        one.close()
        other.close()


def listen(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:PORT (0: a free port)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((LOCAL_HOST, port))
    except OSError as error:
        server.close()
        raise DisplayPortError(f"cannot listen on {LOCAL_HOST}:{port}: {error.strerror}") from error
    server.listen()
    return server


class DisplayPortError(ConnectionLostError):
    """The local port for the display cannot be listened on."""

    code = "display_port"


def serve_display(node: Node, name: str, server: socket.socket, once: bool, said: Callable[[str], None]) -> None:
    """Relay each connection to `server` to the guest's VNC server, through a channel of its own;
    returns after the first connection ends when `once`, else runs until interrupted."""
    relays: list[threading.Thread] = []
    try:
        while True:
            connection, _ = server.accept()
            try:
                relay = node.open_relay("guest.display_attach", {"name": name})
            except AgentCallError as error:  # the agent refused this one (the guest stopped, say)
                connection.close()
                if once:
                    raise
                said(f"a viewer's connection was refused: {error}")
                continue
            except NodeError:
                connection.close()
                raise
            if relay.early:
                connection.sendall(relay.early)
            if once:
                pump(connection, relay.channel)
                return
            thread = threading.Thread(target=pump, args=(connection, relay.channel), daemon=True)
            thread.start()
            relays.append(thread)
    finally:
        server.close()


def check_display(node: Node, name: str) -> None:
    """What the agent says of the guest's display (no_display, guest_not_running, ...) before anything
    listens: one relay opened and closed (QEMU's VNC server sees a viewer come and go)."""
    node.open_relay("guest.display_attach", {"name": name}).channel.close()
