"""What every verb's parser shares: argparse that raises instead of exiting, value types, node options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeAlias

from appliance.errors import UsageError
from appliance.nodes.client import Node, NodeAddress, default_known_hosts
from appliance.nodes.definitions import parse_size_gib
from appliance.nodes.keys import ENV_KEY, ENV_PASSPHRASE, Keyring

KEY_HELP = (
    f"operator private key (default: ${ENV_KEY}, else as ssh: the host's IdentityFile in ~/.ssh/config, "
    f"ssh-agent's keys, ~/.ssh/id_ed25519, id_ecdsa, id_rsa; a passphrase is asked on a terminal or read "
    f"from ${ENV_PASSPHRASE})"
)

# argparse's subparser action is generic to type checkers only.
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class CommandLineError(UsageError):
    """What argparse refuses, raised rather than exiting, so `--json` can print it as JSON too."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self.format_usage(), f"{self.prog}: error: {message}")


def whole_gib(text: str) -> int:
    """A disk size for argparse: a whole number of GiB, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} GiB: a disk needs at least 1")
    return value


def disk_size(text: str) -> int:
    """A disk size for argparse, in GiB: 20G, 2T, or 20 (GiB)."""
    size = parse_size_gib(text)
    if size is None or size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a disk size (e.g. 20G, 2T)")
    return size


def local_port(text: str) -> int:
    """A local TCP port to listen on for argparse: 0 (a free one) or 1-65535."""
    return 0 if text == "0" else tcp_port(text)


def port_number(text: str, protocol: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {protocol} port (1-65535)")
    return int(text)


def tcp_port(text: str) -> int:
    """A TCP port for argparse: 1-65535."""
    return port_number(text, "TCP")


def udp_port(text: str) -> int:
    """A UDP port for argparse: 1-65535."""
    return port_number(text, "UDP")


def add_key_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    """How to reach nodes: the operator key, host key checking, timeout, output."""
    parser.add_argument("--key", type=Path, help=KEY_HELP)
    parser.add_argument("--known-hosts", type=Path, default=default_known_hosts(), help="default: %(default)s")
    parser.add_argument("--strict", action="store_true", help="refuse hosts not yet in the known_hosts file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help="seconds for each step: TCP connect, SSH handshake, authentication, each request (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print the agent\'s answer as JSON; a failure as {"error": {"code": ..., "message": ...}}',
    )


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", help="[user@]host[:port] or an alias from ~/.ssh/config")
    add_key_options(parser, timeout=60.0)


def node_connector(args: argparse.Namespace) -> Callable[[NodeAddress], Node]:
    """Nodes reached with the operator's keys; an explicit key is checked (and its passphrase asked) once, now."""
    keyring = Keyring.for_operator(args.key)
    keyring.check()

    def connect(address: NodeAddress) -> Node:
        return Node(address, keyring, args.known_hosts, args.strict, args.timeout)

    return connect
