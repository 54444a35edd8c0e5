"""The operator side: talk to a node's agent over SSH (paramiko), one channel, many requests.

The node's key forces `appliance-agent serve`, so the channel speaks the
agent's JSON-RPC lines. Host keys are checked against a project known_hosts
file: a new host is recorded on first contact unless strict; a changed key is
always refused, naming both fingerprints. Operator keys come from
appliance.nodes.keys, in ssh's order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from appliance.nodes.errors import (
    AddressError,
    AgentCallError,
    AuthenticationError,
    ConnectionLostError,
    HostKeyError,
    KeyFileError,
    NodeError,
    NodeTimeoutError,
)
from appliance.nodes.keys import KeyOffer, Keyring, fingerprint

__all__ = [
    "AgentCallError",
    "AuthenticationError",
    "ConnectionLostError",
    "HostKeyError",
    "KeyFileError",
    "Node",
    "NodeAddress",
    "NodeError",
    "NodeTimeoutError",
    "default_known_hosts",
    "fingerprint",
    "parse_address",
]

AGENT_COMMAND = "appliance-agent serve"
CHUNK = 1 << 20


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
            try:
                sock = socket.create_connection((self.address.host, self.address.port), timeout=self.timeout)
            except OSError as error:
                raise ConnectionLostError(f"cannot reach {self.address.host}:{self.address.port}: {error}") from error
            transport = paramiko.Transport(sock)
            try:
                transport.start_client(timeout=self.timeout)
                self._check_host_key(transport.get_remote_server_key())
                self._authenticate(transport, offers)
                channel = transport.open_session(timeout=self.timeout)
                channel.settimeout(self.timeout)
                channel.exec_command(AGENT_COMMAND)
            except NodeError:
                transport.close()
                raise
            except (paramiko.SSHException, OSError) as error:
                transport.close()
                raise ConnectionLostError(f"SSH to {self.address.host}:{self.address.port} failed: {error}") from error
        self._transport, self._channel = transport, channel

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
            except paramiko.AuthenticationException:
                refused.append(offer.label)
        said = f"{target} refused key {', '.join(refused)}" if refused else f"{target}: no key could be offered"
        if unusable:
            raise KeyFileError(f"{said}; {'; '.join(str(error) for error in unusable)}")
        raise AuthenticationError(said)

    def _check_host_key(self, key: paramiko.PKey) -> None:
        known = paramiko.HostKeys()
        if self.known_hosts.exists():
            known.load(str(self.known_hosts))
        name = self.address.known_hosts_name
        recorded = known.lookup(name)
        if recorded is None:
            if self.strict:
                raise HostKeyError(f"{name} is not in {self.known_hosts} (strict): its key is {fingerprint(key)}")
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            known.add(name, key.get_name(), key)
            known.save(str(self.known_hosts))
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

    def call(self, method: str, params: dict[str, Any] | None = None, *, idempotent: bool = False) -> Any:
        """One request on the open channel. Idempotent reads are retried once on a lost connection."""
        try:
            return self._call_once(method, params)
        except ConnectionLostError:
            if not idempotent:
                raise
            self.close()
            self.connect()
            return self._call_once(method, params)

    def push_image(self, path: Path, name: str, progress: Callable[[int, int], None] | None = None) -> Any:
        """Stream a local image file to the node's image store; the node checks size and sha256."""
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as source:
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
        params = {"name": name, "size_bytes": size, "sha256": digest.hexdigest()}

        def send_data(channel: paramiko.Channel) -> None:
            sent = 0
            with path.open("rb") as source:
                for block in iter(lambda: source.read(CHUNK), b""):
                    channel.sendall(block)
                    sent += len(block)
                    if progress:
                        progress(sent, size)

        return self._call_once("image.import", params, send_data)

    def _call_once(
        self, method: str, params: dict[str, Any] | None, send_data: Callable[[paramiko.Channel], None] | None = None
    ) -> Any:
        if self._channel is None:
            self.connect()
        assert self._channel is not None
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            self._channel.sendall(json.dumps(message).encode() + b"\n")
            if send_data:
                send_data(self._channel)
            reply = json.loads(self._read_line())
        except TimeoutError as error:
            raise NodeTimeoutError(f"{method}: no answer within {self.timeout:.0f}s") from error
        except (OSError, paramiko.SSHException, EOFError) as error:
            self.close()
            raise ConnectionLostError(f"{method}: connection to {self.address.host} lost: {error}") from error
        if "error" in reply:
            failure = reply["error"]
            data = failure.get("data") or {}
            details = {key: value for key, value in data.items() if key != "code"}
            raise AgentCallError(str(data.get("code", "unknown")), str(failure.get("message", "")), details)
        return reply["result"]

    def _read_line(self) -> bytes:
        assert self._channel is not None
        while b"\n" not in self._buffer:
            chunk = self._channel.recv(65536)
            if not chunk:
                raise EOFError("the agent closed the channel")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line
