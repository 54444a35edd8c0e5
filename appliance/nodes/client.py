"""The operator side: talk to a node's agent over SSH (paramiko), one channel, many requests.

The node's key forces `appliance-agent serve`, so the channel speaks the
agent's JSON-RPC lines. Host keys are checked against a project known_hosts
file: a new host is recorded on first contact unless strict; a changed key is
always refused, naming both fingerprints. Operator keys come from
appliance.nodes.keys, in ssh's order.

The timeout covers each step: the TCP connect, the SSH banner and key
exchange, authentication, opening the channel, and each request. A refused
or reset connection, or one dropped before the SSH banner (sshd past its
MaxStartups drops new connections while busy), is tried again a few times
before the node is called unreachable. Every paramiko and socket error
becomes one of appliance.nodes.errors here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from appliance.agent.errors import AgentError
from appliance.agent.model import check_name
from appliance.nodes.errors import (
    AddressError,
    AgentCallError,
    AuthenticationError,
    ConnectionLostError,
    HostKeyError,
    ImageExistsError,
    ImageFileError,
    ImageNameError,
    KeyFileError,
    NodeError,
    NodeTimeoutError,
    UnreachableError,
)
from appliance.nodes.keys import KeyOffer, Keyring, fingerprint

__all__ = [
    "AgentCallError",
    "AuthenticationError",
    "ConnectionLostError",
    "HostKeyError",
    "ImageExistsError",
    "KeyFileError",
    "Node",
    "NodeAddress",
    "NodeError",
    "NodeTimeoutError",
    "Relay",
    "UnreachableError",
    "check_image_upload",
    "default_known_hosts",
    "fingerprint",
    "parse_address",
]

# paramiko's transport thread logs each failure at ERROR, traceback included; with no logging set up,
# Python prints that on stderr. The failure reaches the caller as a NodeError: the log goes where the
# application sends its logs, or nowhere.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

AGENT_COMMAND = "appliance-agent serve"
CHUNK = 1 << 20
CONNECT_TRIES = 3
RETRY_BACKOFF_SECONDS = 0.5  # doubled after each try


def default_known_hosts() -> Path:
    return Path.home() / ".config" / "appliance" / "known_hosts"


def default_ssh_config() -> Path:
    return Path.home() / ".ssh" / "config"


@dataclass(frozen=True)
class NodeAddress:
    host: str
    port: int = 22
    user: str = "appliance"
    identity_files: tuple[Path, ...] = ()  # from ~/.ssh/config, offered when no --key is given
    identities_only: bool = False  # ~/.ssh/config's IdentitiesOnly: no ssh-agent keys besides those files

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str, ssh_config: Path | None = None) -> NodeAddress:
    """`[user@]host[:port]`, where host may be an alias from ~/.ssh/config (HostName, User, Port and
    IdentityFile honoured, `~` expanded, as ssh does); what the text says wins over the config."""
    user, _, rest = text.rpartition("@")
    host, _, port_text = rest.partition(":")
    if not host or (port_text and not valid_port(port_text)):
        raise AddressError(f"not a node address: {text!r} (expected [user@]host[:port], port 1-65535)")
    config = ssh_config or default_ssh_config()
    resolved_host, resolved_port, resolved_user = host, 22, "appliance"
    identity_files: tuple[Path, ...] = ()
    identities_only = False
    if config.is_file():
        try:
            entry = paramiko.SSHConfig.from_path(str(config)).lookup(host)
        except (paramiko.SSHException, OSError, ValueError) as error:
            raise AddressError(f"cannot read {config}: {error}") from error
        resolved_host = entry.get("hostname", host)
        resolved_user = entry.get("user", resolved_user)
        config_port = entry.get("port", "22")
        if not valid_port(config_port):
            raise AddressError(f"{config}: Port {config_port!r} for {host} is not a port (1-65535)")
        resolved_port = int(config_port)
        identity_files = tuple(Path(name).expanduser() for name in entry.get("identityfile", []))
        identities_only = entry.get("identitiesonly", "no").lower() == "yes"
    return NodeAddress(
        host=resolved_host,
        port=int(port_text) if port_text else resolved_port,
        user=user or resolved_user,
        identity_files=identity_files,
        identities_only=identities_only,
    )


def valid_port(text: str) -> bool:
    return text.isdigit() and 1 <= int(text) <= 65535


def check_image_upload(path: Path, name: str) -> None:
    """What `image push` can tell before contacting the node: a readable file, a name the agent takes."""
    if path.is_dir():
        raise ImageFileError(f"{path} is a directory: give an image file")
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError as error:
        raise ImageFileError(f"no such file: {path}") from error
    except OSError as error:
        raise ImageFileError(f"cannot read {path}: {error.strerror}") from error
    try:
        check_name(name)
    except AgentError as error:
        raise ImageNameError(f"image name {name!r}: {error.message} (give another with --name)") from error


class Node:
    """One SSH connection to a node's agent. KEY is a Keyring (the CLI's), a key file, or None for ssh's
    order of keys (see appliance.nodes.keys)."""

    def __init__(
        self,
        address: NodeAddress,
        key: Keyring | Path | None = None,
        known_hosts: Path | None = None,
        strict: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.keyring = key if isinstance(key, Keyring) else Keyring(key)
        self.known_hosts = known_hosts or default_known_hosts()
        self.strict = strict
        self.timeout = timeout
        self._transport: paramiko.Transport | None = None
        self._channel: paramiko.Channel | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> Node:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        with self.keyring.offers(self.address.identity_files, self.address.identities_only) as offers:
            if not offers:
                raise KeyFileError(self.keyring.no_key_message(self.address.identity_files))
            transport = self._open_transport()
            try:
                self._check_host_key(transport.get_remote_server_key())
                self._authenticate(transport, offers)
                channel = self._agent_channel(transport)
            except NodeError:
                transport.close()
                raise
            except (paramiko.SSHException, OSError, EOFError) as error:
                transport.close()
                if is_timeout(error):
                    raise NodeTimeoutError(
                        f"SSH session with {self.address.where}: no answer within {self.timeout:g}s"
                    ) from error
                raise ConnectionLostError(f"SSH session with {self.address.where} failed: {describe(error)}") from error
        self._transport, self._channel = transport, channel

    def _agent_channel(self, transport: paramiko.Transport) -> paramiko.Channel:
        """A new session on the connection, running the agent (the command the node's key forces anyway)."""
        channel = transport.open_session(timeout=self.timeout)
        channel.settimeout(self.timeout)
        channel.exec_command(AGENT_COMMAND)
        return channel

    def _open_transport(self) -> paramiko.Transport:
        """TCP and the SSH handshake, tried again when the node refuses, resets or drops the connection."""
        reason = ""
        for attempt in range(1, CONNECT_TRIES + 1):
            try:
                return self._handshake()
            except _TryAgain as again:
                reason = again.reason
            if attempt < CONNECT_TRIES:
                time.sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
        raise UnreachableError(f"cannot reach {self.address.where} after {CONNECT_TRIES} tries: {reason}")

    def _handshake(self) -> paramiko.Transport:
        where = self.address.where
        try:
            sock = socket.create_connection((self.address.host, self.address.port), timeout=self.timeout)
        except TimeoutError as error:
            raise NodeTimeoutError(f"cannot reach {where}: no TCP answer within {self.timeout:g}s") from error
        except (ConnectionRefusedError, ConnectionResetError) as error:
            raise _TryAgain(describe(error)) from error
        except socket.gaierror as error:
            raise UnreachableError(
                f"cannot reach {where}: cannot resolve {self.address.host}: {error.strerror}"
            ) from error
        except OSError as error:
            raise UnreachableError(f"cannot reach {where}: {describe(error)}") from error
        try:
            transport = paramiko.Transport(sock)
        except (paramiko.SSHException, OSError) as error:
            sock.close()
            raise _TryAgain(describe(error)) from error
        # Our own wait below decides; paramiko's timers are set past it, as a backstop.
        transport.banner_timeout = transport.handshake_timeout = self.timeout + 5
        transport.auth_timeout = self.timeout
        done = threading.Event()
        try:
            transport.start_client(event=done)
        except (paramiko.SSHException, OSError) as error:
            transport.close()
            raise _TryAgain(describe(error)) from error
        if not done.wait(self.timeout):
            banner = bool(transport.remote_version)
            transport.close()
            what = "finished no SSH key exchange" if banner else "sent no SSH banner"
            raise NodeTimeoutError(
                f"{where} accepted the connection but {what} within {self.timeout:g}s "
                "(a busy node may need a longer --timeout)"
            )
        if not transport.is_active():
            failure = transport.get_exception()
            transport.close()
            if failure is None or dropped(failure):
                raise _TryAgain("the connection was closed before the SSH handshake (a busy sshd drops new "
                                "connections past its MaxStartups)")  # fmt: skip
            raise UnreachableError(f"SSH handshake with {where} failed: {describe(failure)}") from failure
        return transport

    def _authenticate(self, transport: paramiko.Transport, offers: list[KeyOffer]) -> None:
        target = f"{self.address.user}@{self.address.host}"
        refused: list[str] = []
        unusable: list[KeyFileError] = []
        for offer in offers:
            try:
                key = offer.load()
            except KeyFileError as error:
                if len(offers) == 1:
                    raise
                # Another key may do: ssh too skips a key it cannot use, and says so if none works.
                unusable.append(error)
                continue
            try:
                transport.auth_publickey(self.address.user, key)
                return
            except paramiko.BadAuthenticationType as error:
                raise AuthenticationError(
                    f"{target} accepts no keys (it offers {', '.join(error.allowed_types) or 'nothing'})"
                ) from error
            except paramiko.AuthenticationException as error:
                if is_timeout(error):
                    raise NodeTimeoutError(f"{target}: no answer to authentication within {self.timeout:g}s") from error
                refused.append(offer.label)
        said = f"{target} refused key {', '.join(refused)}" if refused else f"{target}: no key could be offered"
        if unusable:
            raise KeyFileError(f"{said}; {'; '.join(str(error) for error in unusable)}")
        raise AuthenticationError(said)

    def _check_host_key(self, key: paramiko.PKey) -> None:
        known = paramiko.HostKeys()
        if self.known_hosts.exists():
            try:
                known.load(str(self.known_hosts))
            except (OSError, paramiko.SSHException, ValueError) as error:
                raise HostKeyError(f"cannot read {self.known_hosts}: {error}") from error
        name = self.address.known_hosts_name
        recorded = known.lookup(name)
        if recorded is None:
            if self.strict:
                raise HostKeyError(f"{name} is not in {self.known_hosts} (strict): its key is {fingerprint(key)}")
            try:
                self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
                known.add(name, key.get_name(), key)
                known.save(str(self.known_hosts))
            except OSError as error:
                raise HostKeyError(f"cannot record {name} in {self.known_hosts}: {error.strerror}") from error
            return
        expected = recorded.get(key.get_name())
        if expected is None or expected.asbytes() != key.asbytes():
            was = fingerprint(expected) if expected else ", ".join(fingerprint(k) for k in recorded.values())
            raise HostKeyError(
                f"host key of {name} changed: recorded {was}, presented {fingerprint(key)} "
                f"(remove the line from {self.known_hosts} if the node was reinstalled)"
            )

    def host_key_fingerprint(self) -> str:
        """SHA256 fingerprint of the key the node presented (connects if needed)."""
        if self._transport is None:
            self.connect()
        assert self._transport is not None
        return fingerprint(self._transport.get_remote_server_key())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._channel = None

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        idempotent: bool = False,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """One request on the open channel. Idempotent reads are retried once on a lost connection.
        ON_PROGRESS hears the `progress` notifications a long method sends before its answer."""
        try:
            return self._call_once(method, params, on_progress=on_progress)
        except ConnectionLostError:
            if not idempotent:
                raise
            self.close()
            self.connect()
            return self._call_once(method, params, on_progress=on_progress)

    def check_push(self, path: Path, name: str) -> None:
        """Whether push_image can go ahead, before a byte is read: the file, the name, and whether the
        node already has an image of that name (an upload of many GB would only then be refused)."""
        check_image_upload(path, name)
        if any(image.get("name") == name for image in self.call("image.list", idempotent=True)):
            raise ImageExistsError(
                f"image_exists: {self.address.host} already has an image named {name!r} (delete it first)"
            )

    def push_image(
        self, path: Path, name: str, progress: Callable[[int, int], None] | None = None, *, checked: bool = False
    ) -> Any:
        """Stream a local image file to the node's image store; the node checks size and sha256.
        check_push runs first unless the caller says it has (`checked`)."""
        if not checked:
            self.check_push(path, name)
        try:
            digest = hashlib.sha256()
            with path.open("rb") as source:
                for block in iter(lambda: source.read(CHUNK), b""):
                    digest.update(block)
        except OSError as error:
            raise ImageFileError(f"cannot read {path}: {error.strerror}") from error
        return self.upload("image.import", {"name": name, "sha256": digest.hexdigest()}, path, progress)

    def upload(
        self, method: str, params: dict[str, Any], path: Path, progress: Callable[[int, int], None] | None = None
    ) -> Any:
        """A request whose line is followed by the file's bytes (image.import, upgrade.send); its size is
        added to the params as size_bytes."""
        try:
            size = path.stat().st_size
        except OSError as error:
            raise ImageFileError(f"cannot read {path}: {error.strerror}") from error

        def send_data(channel: paramiko.Channel) -> None:
            sent = 0
            with path.open("rb") as source:
                for block in iter(lambda: source.read(CHUNK), b""):
                    channel.sendall(block)
                    sent += len(block)
                    if progress:
                        progress(sent, size)

        return self._call_once(method, {**params, "size_bytes": size}, send_data)

    def import_image_from(
        self,
        name: str,
        size: int,
        sha256: str,
        read: Callable[[int], bytes],
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """image.import of `size` bytes that `read(at_most)` gives (another node's image, as a migration
        copies it); the node checks size and sha256. A source that ends early ends this connection (the
        node then drops the partial upload)."""
        params = {"name": name, "size_bytes": size, "sha256": sha256}

        def send_data(channel: paramiko.Channel) -> None:
            sent = 0
            while sent < size:
                block = read(min(CHUNK, size - sent))
                if not block:
                    raise EOFError(f"the source of image {name} ended after {sent} of {size} bytes")
                channel.sendall(block)
                sent += len(block)
                if progress:
                    progress(sent, size)

        return self._call_once("image.import", params, send_data)

    def open_relay(self, method: str, params: dict[str, Any]) -> Relay:
        """A relay method (guest.console_attach, guest.display_attach) on a channel of its own on this
        connection: once the agent answers, the channel carries raw bytes both ways (see the agent's
        protocol.py) until either side closes it. Several relays may be open at once."""
        if self._transport is None:
            self.connect()
        assert self._transport is not None
        try:
            channel = self._agent_channel(self._transport)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise ConnectionLostError(
                f"{method}: cannot open a channel to {self.address.host}: {describe(error)}"
            ) from error
        try:
            result, early = self._exchange(channel, b"", method, params)
        except BaseException:
            channel.close()
            raise
        channel.settimeout(None)
        return Relay(channel, result, early)

    def _call_once(
        self,
        method: str,
        params: dict[str, Any] | None,
        send_data: Callable[[paramiko.Channel], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        if self._channel is None:
            self.connect()
        assert self._channel is not None
        try:
            result, self._buffer = self._exchange(self._channel, self._buffer, method, params, send_data, on_progress)
        except ConnectionLostError:
            self.close()
            raise
        return result

    def _exchange(
        self,
        channel: paramiko.Channel,
        buffer: bytes,
        method: str,
        params: dict[str, Any] | None,
        send_data: Callable[[paramiko.Channel], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Any, bytes]:
        """One request on `channel` (with what it already buffered): the result, and what came after its reply."""
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            channel.sendall(json.dumps(message).encode() + b"\n")
            if send_data:
                send_data(channel)
            line, buffer = read_line(channel, buffer)
            reply = json.loads(line)
            # Notifications (no id) come ahead of the answer: progress of a long method.
            while isinstance(reply, dict) and "id" not in reply and "method" in reply:
                if on_progress and reply.get("method") == "progress":
                    on_progress(reply.get("params") or {})
                line, buffer = read_line(channel, buffer)
                reply = json.loads(line)
        except TimeoutError as error:
            raise NodeTimeoutError(f"{method}: no answer within {self.timeout:g}s") from error
        except (OSError, paramiko.SSHException, EOFError) as error:
            raise ConnectionLostError(f"{method}: connection to {self.address.host} lost: {describe(error)}") from error
        except ValueError as error:
            raise ConnectionLostError(f"{method}: {self.address.host} answered with no JSON: {error}") from error
        if "error" in reply:
            failure = reply["error"]
            data = failure.get("data") or {}
            details = {key: value for key, value in data.items() if key != "code"}
            raise AgentCallError(str(data.get("code", "unknown")), str(failure.get("message", "")), details)
        return reply["result"], buffer


@dataclass(frozen=True)
class Relay:
    """A channel a relay method took over: the agent's answer, and the raw bytes that came right after it
    (the start of the relay, to be used before anything read from the channel)."""

    channel: paramiko.Channel
    result: Any
    early: bytes


def read_line(channel: paramiko.Channel, buffer: bytes) -> tuple[bytes, bytes]:
    """The next line from the channel (after what `buffer` holds), and what came after it."""
    while b"\n" not in buffer:
        chunk = channel.recv(65536)
        if not chunk:
            raise EOFError("the agent closed the channel")
        buffer += chunk
    line, rest = buffer.split(b"\n", 1)
    return line, rest


class _TryAgain(Exception):
    """Inside _open_transport only: this try failed in a way a later one may not."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def causes(error: BaseException) -> list[BaseException]:
    """ERROR and what it was raised from or during (paramiko wraps socket errors in SSHException)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def dropped(error: BaseException) -> bool:
    """The node closed or reset the connection (as sshd does to connections past MaxStartups)."""
    return any(isinstance(cause, EOFError | ConnectionResetError | ConnectionAbortedError | BrokenPipeError)
               for cause in causes(error))  # fmt: skip


def is_timeout(error: BaseException) -> bool:
    if any(isinstance(cause, TimeoutError) for cause in causes(error)):
        return True
    return "timeout" in str(error).lower()  # paramiko's "Authentication timeout.", "Timeout opening channel."


def describe(error: BaseException) -> str:
    """A one-line reason: the OS's words for socket errors, paramiko's message otherwise."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__
