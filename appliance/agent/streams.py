"""A migration's bytes, relayed by the agents at both ends (protocol.py's relay methods).

The nodes open no port and never reach each other: the client opens, on each
node's SSH connection, one channel per stream, and pumps each pair.

- source_stream (leaving node): listens on a unix socket in the guest's
  directory, where its QEMU connects for the stream (the memory: `migrate`
  to unix:PATH; a disk: the NBD target of its mirror), and relays that
  connection over the channel.
- dest_stream (arriving node): connects to the arriving QEMU's migration
  listener (the memory) or its NBD server (a disk), and relays.
- send_file / receive_file: one file copied whole (a stopped guest's disks,
  a running guest's cloud-init seed, an image missing on the destination:
  that one arrives through image.import), checked against its size and
  sha256 before it is put in place; receive_file answers with one JSON line
  after the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import socket
import threading
from pathlib import Path
from typing import Any, BinaryIO

from appliance.agent.arriving import MEMORY_SOCKET, NBD_SOCKET, arrival_owner
from appliance.agent.consoles import ByteSource, relay_bytes
from appliance.agent.errors import AgentError, ErrorCode, guest_not_running
from appliance.agent.guests import Hypervisor, drive_id
from appliance.agent.migration import DISK_FILE, MEMORY, Method, Sessions, copied_files, name_of, outgoing_socket
from appliance.agent.model import check_fields, check_int, check_name, invalid_field
from appliance.agent.protocol import Handover, error_message, result_message
from appliance.agent.qemu import running_pid
from appliance.agent.seed import SEED_PREFIX
from appliance.agent.store import Store

CHUNK = 256 * 1024
# How long a leaving guest's stream waits for its QEMU to connect (the memory waits for every disk's
# mirror to be in step first); the client going ends the wait sooner.
ACCEPT_SECONDS = 6 * 3600.0
POLL_SECONDS = 0.5
SEED_FILE = re.compile(re.escape(SEED_PREFIX) + r"iid-[0-9a-f]{16}\.vfat")
SHA256 = re.compile(r"[0-9a-f]{64}")


def stream_of(params: dict[str, Any], drives: set[str]) -> str:
    stream = params.get("stream")
    if stream != MEMORY and stream not in drives:
        has = ", ".join([MEMORY, *sorted(drives)])
        raise invalid_field("stream", f"{stream!r} is no stream of this guest (its streams: {has})")
    return str(stream)


def source_stream(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> Handover:
    name = name_of(params, {"stream"})
    spec = store.guest(name)
    paths = host.paths(name)
    if running_pid(paths) is None:
        raise guest_not_running(name)
    stream = stream_of(params, {drive_id(disk) for disk in spec.disks})
    path = outgoing_socket(paths, stream)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
    except OSError as error:
        listener.close()
        raise AgentError(ErrorCode.MIGRATION_FAILED, f"guest {name!r}: cannot listen on {path}: {error}") from error

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        try:
            relay_accepted(listener, requests, replies)
        finally:
            listener.close()
            path.unlink(missing_ok=True)

    return Handover({"name": name, "stream": stream}, relay)


def relay_accepted(listener: socket.socket, requests: BinaryIO, replies: BinaryIO) -> None:
    """The first connection to `listener`, relayed both ways until either side closes. What the client
    sends before QEMU connects (an NBD server's greeting) waits for it; the client going ends the wait."""
    inbox: queue.Queue[bytes | None] = queue.Queue()
    source: ByteSource = requests  # type: ignore[assignment]
    ended = threading.Event()

    def read_client() -> None:
        try:
            while data := source.read1(CHUNK):
                inbox.put(data)
        except OSError:
            pass
        ended.set()
        inbox.put(None)

    threading.Thread(target=read_client, name="stream-client", daemon=True).start()
    listener.settimeout(POLL_SECONDS)
    waited = 0.0
    while True:
        try:
            connection, _ = listener.accept()
            break
        except TimeoutError:
            waited += POLL_SECONDS
            if ended.is_set() or waited >= ACCEPT_SECONDS:
                return
    connection.settimeout(None)

    def to_qemu() -> None:
        try:
            while (data := inbox.get()) is not None:
                connection.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=to_qemu, name="stream-qemu", daemon=True).start()
    with connection:
        try:
            while data := connection.recv(CHUNK):
                replies.write(data)
                replies.flush()
        except OSError:
            pass  # the client went, or QEMU did: the stream is over either way


def arriving_directory(host: Hypervisor, name: str) -> Path:
    """The directory of a guest arriving here, owned by an agent that is alive."""
    directory = host.paths(name).directory
    owner = arrival_owner(directory)
    if owner is None or not Path(f"/proc/{owner}").exists():
        raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r} is not arriving on this node")
    return directory


def dest_stream(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> Handover:
    name = name_of(params, {"stream"})
    directory = arriving_directory(host, name)
    drives = {path.stem for path in directory.glob("disk*.qcow2")}
    stream = stream_of(params, drives)
    target = directory / (MEMORY_SOCKET if stream == MEMORY else NBD_SOCKET)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(target))
    except OSError as error:
        connection.close()
        raise AgentError(
            ErrorCode.NOT_MIGRATING, f"guest {name!r}: QEMU here is not waiting for its {stream} ({error.strerror})"
        ) from error

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        with connection:
            relay_bytes(connection, requests, replies)

    return Handover({"name": name, "stream": stream}, relay)


def send_file(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> Handover:
    """A guest's file (`name`, `file`: one copied_files names) or an image (`image`), whole; the answer
    gives its size and sha256 (an image's from the store, which checked it on import)."""
    check_fields(params, {"name", "file", "image"}, "params")
    if "image" in params:
        image = check_name(params.get("image"), "image")
        path = host.image(image)
        sha256 = next(str(row["sha256"]) for row in store.images() if row["name"] == image)
    else:
        name = check_name(params.get("name"))
        spec = store.guest(name)
        paths = host.paths(name)
        file = params.get("file")
        allowed = copied_files(spec, live=running_pid(paths) is not None)
        if file not in allowed:
            raise invalid_field("file", f"{file!r} is not a file of guest {name!r} to copy (those: {allowed})")
        path = paths.directory / str(file)
        sha256 = file_sha256(path)
    size = path.stat().st_size

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        with path.open("rb") as source:
            while chunk := source.read(CHUNK):
                replies.write(chunk)
        replies.flush()

    return Handover({"size": size, "sha256": sha256}, relay)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def receive_file(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> Handover:
    """`size` bytes after the answer, into an arriving guest's directory as `file` once whole and of the
    given sha256; then one JSON line says how it went (a result, or an error)."""
    name = name_of(params, {"file", "size", "sha256"})
    file = params.get("file")
    if not isinstance(file, str) or not (DISK_FILE.fullmatch(file) or SEED_FILE.fullmatch(file)):
        raise invalid_field("file", "must be a guest's disk file or cloud-init seed")
    size = check_int(params, "size", 0, 1 << 50)
    sha256 = params.get("sha256")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise invalid_field("sha256", "must be 64 lower-case hex digits")
    directory = arriving_directory(host, name)
    target = directory / file
    if target.exists():
        raise invalid_field("file", f"{file} is here already")
    partial = directory / f".receiving-{os.getpid()}-{file}"

    def relay(requests: BinaryIO, replies: BinaryIO) -> None:
        digest = hashlib.sha256()
        received = 0
        try:
            with partial.open("wb") as out:
                while received < size and (chunk := requests.read(min(CHUNK, size - received))):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if received != size:
                ended = f"{file}: the stream ended after {received} of {size} bytes"
                raise AgentError(ErrorCode.UPLOAD_INCOMPLETE, ended)
            if digest.hexdigest() != sha256:
                raise AgentError(ErrorCode.CHECKSUM_MISMATCH, f"{file}: sha256 {digest.hexdigest()}, not {sha256}")
            partial.rename(target)
            replies.write(result_message(None, {"file": file, "size": size, "sha256": sha256}))
        except AgentError as error:
            replies.write(error_message(None, error))
        finally:
            partial.unlink(missing_ok=True)
        replies.flush()

    return Handover({"name": name, "file": file, "receiving": size}, relay)


METHODS: dict[str, Method] = {
    "migration.source_stream": source_stream,
    "migration.dest_stream": dest_stream,
    "migration.send_file": send_file,
    "migration.receive_file": receive_file,
}
