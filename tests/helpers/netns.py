"""Network namespaces the tests make and remove, and what runs in them: bridges, veths, TCP listeners,
dnsmasq, and the root tap helper behind its socket as systemd would run it.

Nothing here touches the host's own network: every link is made inside a
namespace with a unique name, and every process started in one is ended
before the namespace is deleted.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers.waiting import wait_until

REPOSITORY = Path(__file__).resolve().parents[2]
# The agent needs only the standard library: the system's python3 runs it as any user (the venv's
# interpreter lives under /root, which other users cannot reach).
SYSTEM_PYTHON = "/usr/bin/python3"

# Answers every connection with `reply`, so a guest can tell which listener it reached.
LISTENER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(16)
while True:
    connection, _ = server.accept()
    connection.sendall(sys.argv[3].encode() + b"\\n")
    connection.close()
"""


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def start(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
        """A process inside the namespace, ended when the namespace is removed."""
        process = subprocess.Popen([*self.exec_prefix(), *argv], **options)
        self.processes.append(process)
        return process

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in json.loads(self.ip("-j", "link", "show"))}

    def bridge_ports(self, bridge: str) -> list[str]:
        return sorted(name for name, link in self.links().items() if link.get("master") == bridge)

    def add_bridge(self, name: str, address: str) -> None:
        self.ip("link", "add", name, "type", "bridge")
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")

    def listen(self, host: str, port: int, reply: str) -> None:
        """A TCP listener on host:port inside the namespace that answers `reply`."""
        self.start([SYSTEM_PYTHON, "-c", LISTENER, host, str(port), reply])
        wait_until(lambda: self.listening(port), 10, f"a listener on {host}:{port} in {self.name}")

    def listening(self, port: int) -> bool:
        result = subprocess.run(
            [*self.exec_prefix(), "ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=False
        )
        return bool(result.stdout.strip())

    def dnsmasq(self, interface: str, dhcp_range: str, hosts: Sequence[str], log: Path) -> None:
        """DHCP only (no DNS) on `interface`; `hosts` are dnsmasq dhcp-host entries (MAC,ADDRESS)."""
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--user=root",
            f"--interface={interface}", "--bind-interfaces", f"--dhcp-range={dhcp_range}", "--dhcp-authoritative",
            "--leasefile-ro", "--pid-file=", "--log-dhcp", f"--log-facility={log}",
            *(f"--dhcp-host={host}" for host in hosts),
        ]  # fmt: skip
        self.start(argv)

    def tap_helper(self, socket_path: Path, config: Path) -> None:
        """The root tap helper as appliance-tap-helper.socket runs it on a node: one process per
        connection, the connection as its stdin (systemd-socket-activate --accept --inetd)."""
        helper = [SYSTEM_PYTHON, "-m", "appliance.agent", "--config", str(config), "tap-helper"]
        activate = ["systemd-socket-activate", "--listen", str(socket_path), "--accept", "--inetd"]
        self.start([*activate, f"--setenv=PYTHONPATH={REPOSITORY}", *helper], stderr=subprocess.DEVNULL)
        wait_until(socket_path.exists, 10, f"the tap helper's socket {socket_path}")
        # On the node the socket is the agent user's group's (SocketMode=0660); here the agent runs as nobody.
        socket_path.chmod(0o666)

    def remove(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@contextmanager
def network_namespace(prefix: str) -> Iterator[Namespace]:
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    namespace = Namespace(name)
    try:
        namespace.ip("link", "set", "lo", "up")
        yield namespace
    finally:
        namespace.remove()


def veth_to(inside: Namespace, outside: Namespace, name: str) -> tuple[str, str]:
    """A veth pair from one namespace to the other; returns the two ends' names."""
    peer = f"{name}p"
    inside.ip("link", "add", name, "type", "veth", "peer", "name", peer, "netns", outside.name)
    inside.ip("link", "set", name, "up")
    outside.ip("link", "set", peer, "up")
    return name, peer


def unprivileged_wrapper(namespace: Namespace, uid: int = 65534) -> list[str]:
    """Run a command inside the namespace as an unprivileged user with no groups (as the agent runs)."""
    return [*namespace.exec_prefix(), "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


# What an agent run by SYSTEM_PYTHON needs to find this repository's package.
PYTHON_ENV = {"PYTHONPATH": str(REPOSITORY)}
