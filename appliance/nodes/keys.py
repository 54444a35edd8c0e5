"""Which private keys to offer a node, in the order an operator expects from `ssh`, and loading them.

The order: `--key` (or APPLIANCE_SSH_KEY) alone if given; else the
IdentityFile lines of the host's ~/.ssh/config entry, then ssh-agent's keys
(unless IdentitiesOnly); else the keys of a running ssh-agent
(SSH_AUTH_SOCK), then the default ~/.ssh/id_ed25519, id_ecdsa and id_rsa.
A passphrase-protected key is signed by ssh-agent when the agent holds it
(its KEY.pub says which), else decrypted with APPLIANCE_SSH_PASSPHRASE, else
with a passphrase asked on the terminal; with neither, it is refused saying
how to give one.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import paramiko
from paramiko.pkey import UnknownKeyType

from appliance.nodes.errors import KeyFileError

ENV_KEY = "APPLIANCE_SSH_KEY"
ENV_PASSPHRASE = "APPLIANCE_SSH_PASSPHRASE"
DEFAULT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
PASSPHRASE_TRIES = 3
# How a public key file starts (OpenSSH's one-line form, or RFC 4716's).
PUBLIC_KEY_STARTS = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-", "---- BEGIN SSH2 PUBLIC KEY")

AskPassphrase = Callable[[str], str]


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def terminal_prompt() -> AskPassphrase | None:
    """getpass when there is a terminal to ask on, else None (scripts, CI, a fleet run under cron)."""
    return getpass.getpass if sys.stdin.isatty() else None


@dataclass(frozen=True)
class KeyOffer:
    label: str  # what the operator recognises: a file, or "ssh-agent key SHA256:... comment"
    load: Callable[[], paramiko.PKey]


class Keyring:
    """The operator's keys. Shared by the threads of a fleet run: a file is read, and its passphrase
    asked, once."""

    def __init__(
        self,
        explicit: Path | None = None,
        *,
        home: Path | None = None,
        ask: AskPassphrase | None = None,
        passphrase: str | None = None,
    ) -> None:
        env_key = os.environ.get(ENV_KEY)
        self.explicit = explicit or (Path(env_key).expanduser() if env_key else None)
        self.explicit_from = "--key" if explicit else ENV_KEY
        self.home = home or Path.home()
        self.ask = ask
        self.passphrase = passphrase if passphrase is not None else os.environ.get(ENV_PASSPHRASE)
        self._lock = threading.Lock()
        self._loaded: dict[Path, paramiko.PKey] = {}

    @classmethod
    def for_operator(cls, explicit: Path | None) -> Keyring:
        """As the CLI uses it: the environment's variables, and a prompt when there is a terminal."""
        return cls(explicit, ask=terminal_prompt())

    def check(self) -> None:
        """Load the explicit key now, before any node is contacted: a wrong file or a passphrase is
        dealt with once, not once per node."""
        if self.explicit is not None:
            with agent_keys() as held:
                self._load_file(self.explicit, held)

    @contextmanager
    def offers(self, identity_files: tuple[Path, ...], identities_only: bool = False) -> Iterator[list[KeyOffer]]:
        """The keys to offer a host, in order; ssh-agent stays connected while they are used."""
        with agent_keys() as held:
            yield self._offers(identity_files, identities_only, held)

    def _offers(
        self, identity_files: tuple[Path, ...], identities_only: bool, held: list[paramiko.AgentKey]
    ) -> list[KeyOffer]:
        if self.explicit is not None:
            return [self._file_offer(self.explicit, held)]
        configured = [path for path in identity_files if path.exists()]
        files = configured or [
            path for path in (self.home / ".ssh" / name for name in DEFAULT_KEY_NAMES) if path.is_file()
        ]
        if configured and identities_only:
            return [self._file_offer(path, held) for path in files]
        # A file whose public half the agent holds is offered once, through the agent.
        blobs = {public_blob(path) for path in files}
        agent = [agent_offer(key) for key in held if key.asbytes() not in blobs]
        if configured:
            return [self._file_offer(path, held) for path in files] + agent
        return agent + [self._file_offer(path, held) for path in files]

    def no_key_message(self, identity_files: tuple[Path, ...]) -> str:
        missing = [str(path) for path in identity_files if not path.exists()]
        where = f" (IdentityFile {', '.join(missing)} not found)" if missing else ""
        return (
            f"no operator key to offer{where}: give --key KEY, set {ENV_KEY}, name an IdentityFile for the host "
            f"in ~/.ssh/config, add a key to ssh-agent, or create {self.home / '.ssh' / DEFAULT_KEY_NAMES[0]}"
        )

    def _file_offer(self, path: Path, held: list[paramiko.AgentKey]) -> KeyOffer:
        return KeyOffer(str(path), lambda: self._load_file(path, held))

    def _load_file(self, path: Path, held: list[paramiko.AgentKey]) -> paramiko.PKey:
        with self._lock:
            if path in self._loaded:
                return self._loaded[path]
            key = read_private_key(path, None)
            if key is None:
                # Encrypted. The agent signing with it saves asking (as ssh does); not kept, as the
                # agent connection it uses closes after this host.
                blob = public_blob(path)
                for agent_key in held:
                    if agent_key.asbytes() == blob:
                        return agent_key
                key = self._decrypt(path)
            self._loaded[path] = key
            return key

    def _decrypt(self, path: Path) -> paramiko.PKey:
        if self.passphrase is not None:
            key = read_private_key(path, self.passphrase)
            if key is None:
                raise KeyFileError(f"wrong passphrase for key {path} (from {ENV_PASSPHRASE})")
            return key
        if self.ask is None:
            raise KeyFileError(
                f"key {path} is protected by a passphrase and there is no terminal to ask on: "
                f"set {ENV_PASSPHRASE}, or add the key to ssh-agent (ssh-add {path})"
            )
        for _ in range(PASSPHRASE_TRIES):
            key = read_private_key(path, self.ask(f"Enter passphrase for key '{path}': "))
            if key is not None:
                return key
        raise KeyFileError(f"wrong passphrase for key {path} ({PASSPHRASE_TRIES} tries)")


def agent_offer(key: paramiko.AgentKey) -> KeyOffer:
    return KeyOffer(f"ssh-agent key {fingerprint(key)} {key.comment}".rstrip(), lambda: key)


def read_private_key(path: Path, passphrase: str | None) -> paramiko.PKey | None:
    """The key in PATH; None when it is encrypted and PASSPHRASE is missing or wrong."""
    if path.is_dir():
        raise KeyFileError(f"key {path} is a directory, not a private key file")
    try:
        head = path.read_bytes()[:64]
    except FileNotFoundError as error:
        raise KeyFileError(f"no such key file: {path}") from error
    except OSError as error:
        raise KeyFileError(f"cannot read key {path}: {error.strerror}") from error
    if head.lstrip().decode(errors="replace").startswith(PUBLIC_KEY_STARTS):
        private = path.with_suffix("") if path.suffix == ".pub" else None
        hint = f" (--key {private})" if private is not None and private.is_file() else ""
        raise KeyFileError(f"{path} is a public key: give the private key{hint}")
    try:
        # paramiko's stubs say str; its cryptography backend wants bytes.
        password = cast(str, passphrase.encode()) if passphrase is not None else None
        return paramiko.PKey.from_path(path, password=password)
    except TypeError:
        # paramiko (through cryptography) says "encrypted, no password given" with a TypeError.
        if passphrase is None:
            return None
        raise
    except ValueError as error:
        # The same ValueError says "not a key" and "wrong password": only a passphrase tells them apart.
        if passphrase is not None:
            return None
        raise KeyFileError(f"{path} is not a private key paramiko can read: {error}") from error
    except UnknownKeyType as error:
        raise KeyFileError(f"{path}: unsupported key type {error.key_type}") from error
    except paramiko.SSHException as error:
        raise KeyFileError(f"{path} is not a private key paramiko can read: {error}") from error


def public_blob(private: Path) -> bytes | None:
    """The public key beside PRIVATE (PRIVATE.pub), as the agent lists keys; None if absent or unreadable."""
    try:
        fields = private.with_name(private.name + ".pub").read_text().split()
        return base64.b64decode(fields[1], validate=True)
    except (OSError, IndexError, ValueError, binascii.Error):
        return None


@contextmanager
def agent_keys() -> Iterator[list[paramiko.AgentKey]]:
    """The keys of the ssh-agent at SSH_AUTH_SOCK (none without one), the agent connected while used."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        yield []
        return
    try:
        agent = paramiko.Agent()
    except paramiko.SSHException:
        # A dangling SSH_AUTH_SOCK: ssh carries on without the agent too.
        yield []
        return
    try:
        yield list(agent.get_keys())
    finally:
        agent.close()
