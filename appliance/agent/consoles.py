"""A running guest's consoles, relayed over the operator's own connection: the serial console and the
graphical display.

QEMU serves each on a unix socket in the guest's directory (qemu.py's serial
chardev, which also keeps logging console.log; media.py's VNC server), never
on a TCP port. The node's sshd forbids forwarding, so the agent itself, the
command every operator key is forced to, connects to the socket and relays
raw bytes between it and the SSH channel (protocol.py's relay methods).

QEMU's serial socket takes one client at a time and leaves a second one
hanging unanswered; a lock per guest (held while attached, released when the
attached agent ends, however it ends) refuses the second attach at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from appliance.agent.errors import AgentError, ErrorCode, guest_not_running
from appliance.agent.guests import Hypervisor
from appliance.agent.locks import LockTimeout, held
from appliance.agent.protocol import Handover
from appliance.agent.qemu import running_pid
from appliance.agent.store import Store

CHUNK = 64 * 1024
CONNECT_SECONDS = 5.0


class ByteSource(Protocol):
    def read1(self, size: int = ..., /) -> bytes: ...


def console_attach(host: Hypervisor, store: Store, name: str) -> Handover:
    """The guest's serial console, interactive, for one client at a time."""
    store.guest(name)
    paths = host.paths(name)
    if running_pid(paths) is None:
        raise guest_not_running(name)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held(host.state_dir / "locks" / f"console-{name}.lock", 0))
        except LockTimeout as error:
            raise AgentError(
                ErrorCode.CONSOLE_BUSY,
                f"guest {name!r}: its serial console is attached elsewhere; one interactive attach at a time "
                "(guest.console shows its log meanwhile)",
            ) from error
        connection = stack.enter_context(connect(name, paths.serial_socket, "serial console"))
        owned = stack.pop_all()

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        with owned:
            relay_bytes(connection, requests, replies)

    return Handover({"name": name, "attached": "serial"}, relay)


def display_attach(host: Hypervisor, store: Store, name: str) -> Handover:
    """One connection to the guest's VNC server (QEMU takes several at once)."""
    spec = store.guest(name)
    paths = host.paths(name)
    if not spec.display:
        raise AgentError(
            ErrorCode.NO_DISPLAY, f"guest {name!r} has no display: set display true (guest.update), then restart it"
        )
    if running_pid(paths) is None:
        raise guest_not_running(name)
    connection = connect(name, paths.vnc_socket, "display")

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        with connection:
            relay_bytes(connection, requests, replies)

    return Handover({"name": name, "attached": "display"}, relay)


def connect(name: str, path: Path, what: str) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(CONNECT_SECONDS)
    try:
        connection.connect(str(path))
    except OSError as error:
        connection.close()
        # A guest started by an older agent has a console log only, and no display socket.
        raise AgentError(
            ErrorCode.UNSUPPORTED, f"guest {name!r}: its {what} cannot be reached ({error.strerror}); restart it"
        ) from error
    connection.settimeout(None)
    return connection


def relay_bytes(connection: socket.socket, requests: BinaryIO, replies: BinaryIO) -> None:
    """Bytes both ways until either side closes: the client's to the socket in a thread of its own
    (what the request stream already buffered first), the socket's to the client here."""
    source = cast(ByteSource, requests)

    def inbound() -> None:
        try:
            while data := source.read1(CHUNK):
                connection.sendall(data)
        except OSError:
            pass
        finally:
            # QEMU sees the end of the client's side and lets go of the socket; the loop below ends.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=inbound, name="relay-inbound", daemon=True).start()
    try:
        while data := connection.recv(CHUNK):
            replies.write(data)
            replies.flush()
    except OSError:
        pass  # the client went (a broken pipe) or QEMU did: the relay is over either way
