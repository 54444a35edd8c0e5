"""Live migration between two appliance nodes nested in QEMU (slow).

Two nodes booted at once from the session's build (each from a directory of
its own), each with a second NIC on one host network (`appliance boot --lan`:
QEMU's socket networking, multicast kept to the loopback interface). The tiny
guest counts on node 1, and the real CLI, through the nodes' SSH port
forwards, moves it to node 2 (relayed: every byte through this machine's two
SSH connections), then back with --direct (the nodes' QEMUs connect to each
other over TLS across that network; each node's address on it is set through
the break-glass shell, since the default spec configures the first NIC only).
Wherever it is, it goes on counting from where it was, and the node it left
has nothing of it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest, tiny_counts
from helpers.waiting import wait_until
from system.conftest import own_copy

from appliance.agent.guests import CONSOLE_TAIL_MAX
from appliance.boot.vm import lan_mac
from appliance.manifest import ArtifactKind
from appliance.nodes.client import Node, NodeAddress

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900
# Nested TCG (the guest's QEMU emulated inside a node QEMU emulates): its kernel boots in minutes.
GUEST_DEADLINE = 900.0
COMMAND_TIMEOUT = 900.0
GUEST = "nested-counter"
# As small as the tiny guest's Debian kernel boots in (not in 64 MiB), and no disk: less to move.
GUEST_MEMORY_MIB = "96"
LAN_PREFIX = "192.168.150."
FIGURES: dict[str, Any] = {}
# The guest counts once a second; asked more often, the node's agent would only take the CPU the guest needs.
CONSOLE_POLL = 0.5


def appliance(*args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL, timeout=timeout)  # fmt: skip


@dataclass(frozen=True)
class LanNode:
    out_dir: Path
    ssh_port: int
    lan_address: str  # on its second NIC

    @property
    def host(self) -> str:
        return f"appliance@127.0.0.1:{self.ssh_port}"


@dataclass(frozen=True)
class LanNodes:
    """Node 1 and node 2, reached with KEY (host keys in KNOWN_HOSTS, the test's own)."""

    nodes: tuple[LanNode, LanNode]
    key: Path
    known_hosts: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return appliance(*args, "--key", str(self.key), "--known-hosts", str(self.known_hosts))

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        # A string, which pytest shows whole (the agent's message is the end of a long line).
        assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def client(self, node: LanNode) -> Node:
        return Node(NodeAddress("127.0.0.1", node.ssh_port, "appliance"), self.key, self.known_hosts, timeout=300)

    def breakglass(self, node: LanNode, script: str) -> str:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(node.ssh_port), "-o", "BatchMode=yes", "-o",
             "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "breakglass@127.0.0.1",
             "sudo -n bash -s"],
            input=script, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (script, done.stdout, done.stderr)
        return done.stdout


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def lan_address_script(mac: str, address: str) -> str:
    """The NIC with MAC (the LAN one: the node leaves it unconfigured) up, with ADDRESS."""
    return f"""set -eu
nic=$(grep -lx '{mac}' /sys/class/net/*/address)
nic=${{nic%/address}}
ip link set "${{nic##*/}}" up
ip addr add {address}/24 dev "${{nic##*/}}"
"""


def reach_script(address: str) -> str:
    """The other node's sshd over the LAN: its banner, or the reason it cannot be had."""
    return f"timeout 30 bash -c 'exec 3<>/dev/tcp/{address}/22; head -c 8 <&3' || echo unreachable\n"


def boot_on_lan(out_dir: Path, lan_port: int) -> subprocess.Popen[str]:
    command = ["boot", str(out_dir), "--wait", "--timeout", str(BOOT_TIMEOUT), "--lan", str(lan_port)]
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def lan_nodes(
    built_appliance: Path, operator_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LanNodes]:
    """Both nodes booted from the ISO at once, on one --lan; their LAN addresses set; stopped at the end."""
    base = tmp_path_factory.mktemp("lan-nodes")
    out_dirs = [own_copy(built_appliance, base / f"node{number}", (ArtifactKind.ISO,)) for number in (1, 2)]
    lan_port = free_udp_port()
    started = time.monotonic()
    booting = [boot_on_lan(out_dir, lan_port) for out_dir in out_dirs]
    try:
        for process in booting:
            output = process.communicate(timeout=BOOT_TIMEOUT + 60)[0]
            assert process.returncode == 0, output
        FIGURES["both_nodes_booted_seconds"] = round(time.monotonic() - started)
        first, second = (
            LanNode(out_dir, int((out_dir / "run" / "ssh-port").read_text()), f"{LAN_PREFIX}{number}")
            for number, out_dir in enumerate(out_dirs, start=1)
        )
        pair = LanNodes((first, second), operator_key, base / "known_hosts")
        for node in pair.nodes:
            # The MAC the runner gave the node's LAN NIC: how the node's shell finds that NIC.
            pair.breakglass(node, lan_address_script(lan_mac(node.out_dir / "run"), node.lan_address))
        assert pair.breakglass(first, reach_script(second.lan_address)).startswith("SSH-2.0")
        yield pair
    finally:
        for process in booting:
            if process.poll() is None:
                process.kill()
                process.wait()
        for out_dir in out_dirs:
            appliance("stop", str(out_dir))


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    """The boot, the guest's start and each move, in seconds (pytest -s shows them)."""
    yield
    print("\nnested migration figures:", json.dumps(FIGURES, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


@dataclass
class Counting:
    """The tiny guest, counting on whichever node it is on now."""

    at: LanNode
    definition: dict[str, Any]


def console(client: Node) -> str:
    reply = client.call("guest.console", {"name": GUEST, "max_bytes": CONSOLE_TAIL_MAX}, idempotent=True)
    text: str = reply["text"]
    return text


def counts_on(client: Node, at_least: int) -> list[int]:
    """The guest's counts on the console, once it has counted AT_LEAST times there (asked again and again
    on one connection: each new one starts an agent on the node, slow under TCG)."""

    def counted() -> list[int]:
        seen = tiny_counts(console(client))
        return seen if len(seen) >= at_least else []

    where = f"{client.address.host}:{client.address.port}"
    return wait_until(counted, GUEST_DEADLINE, f"the guest to count to {at_least} on {where}", poll=CONSOLE_POLL)


def images_of(client: Node) -> dict[str, str]:
    """The node's images: name to sha256."""
    return {image["name"]: image["sha256"] for image in client.call("image.list", idempotent=True)}


@pytest.fixture(scope="module")
def counting(lan_nodes: LanNodes, tiny_guest: TinyGuest) -> Counting:
    """The tiny guest on node 1 (its kernel and initrd pushed there alone), started, counted to 3."""
    node = lan_nodes.nodes[0]
    for path, image in ((tiny_guest.kernel, f"{GUEST}-vmlinuz"), (tiny_guest.initrd, f"{GUEST}-initrd")):
        lan_nodes.ok("image", "push", node.host, str(path), "--name", image)
    lan_nodes.ok("guest", "create", node.host, GUEST, "--memory", GUEST_MEMORY_MIB, "--kernel", f"{GUEST}-vmlinuz",
                 "--initrd", f"{GUEST}-initrd", "--cmdline", f"{tiny_guest.cmdline} tiny.counter")  # fmt: skip
    started = time.monotonic()
    lan_nodes.ok("guest", "start", node.host, GUEST)
    with lan_nodes.client(node) as client:
        counts_on(client, 3)
        FIGURES["guest_started_and_counted_to_3_seconds"] = round(time.monotonic() - started)
        return Counting(node, client.call("guest.info", {"name": GUEST})["definition"])


def other(pair: LanNodes, node: LanNode) -> LanNode:
    return pair.nodes[1] if node == pair.nodes[0] else pair.nodes[0]


def move(pair: LanNodes, counting: Counting, *options: str) -> dict[str, Any]:
    """Migrate the guest to the other node with the CLI; assert it counts on there from where it was, with its
    definition and its images (those the destination lacked copied), and that the node it left has nothing
    of it; the CLI's answer. The checks ask each node on one connection of their own, held throughout."""
    source, destination = counting.at, other(pair, counting.at)
    with pair.client(source) as at_source, pair.client(destination) as at_destination:
        boot = counting.definition["kernel_boot"]
        images = {name: sha256 for name, sha256 in images_of(at_source).items()
                  if name in (boot["kernel_image"], boot["initrd_image"])}  # fmt: skip
        lacking = sorted(set(images) - set(images_of(at_destination)))
        before = counts_on(at_source, 1)[-1]

        result: dict[str, Any] = pair.json("guest", "migrate", source.host, GUEST, destination.host, *options)

        counting.at = destination
        FIGURES[f"migrate_{result['route']}"] = {key: result[key] for key in ("seconds", "downtime_ms", "memory_bytes")}
        assert (result["live"], result["state"]) == (True, "running"), result
        assert GUEST not in [guest["name"] for guest in at_source.call("guest.list")]
        info = at_destination.call("guest.info", {"name": GUEST})
        assert info["state"] == "running" and info["definition"] == counting.definition
        assert sorted(result["images_copied"]) == lacking
        assert {name: images_of(at_destination).get(name) for name in images} == images
        arrived = time.monotonic()
        seen = counts_on(at_destination, 3)
        FIGURES[f"counted_3_at_the_destination_{result['route']}_seconds"] = round(time.monotonic() - arrived)
        assert seen[0] > before, (before, seen)  # it counted on at the source during the move, and on from there
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen  # no gap, no start over
        assert TINY_GUEST_MARKER not in console(at_destination)  # no boot there
    return result


def test_a_running_guest_moves_live_to_the_other_nested_node_relayed(lan_nodes: LanNodes, counting: Counting) -> None:
    result = move(lan_nodes, counting)
    assert result["route"] == "relayed"


def test_a_running_guest_moves_live_straight_across_the_nodes_lan(lan_nodes: LanNodes, counting: Counting) -> None:
    """--direct: the source's QEMU connects to the destination's over the second NICs, at the LAN address."""
    destination = other(lan_nodes, counting.at)
    result = move(lan_nodes, counting, "--direct", "--direct-address", destination.lan_address)
    assert result["route"] == "direct"
