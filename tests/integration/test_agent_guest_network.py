"""Guest NICs for real: two tiny guests on a bridge, and a guest on user-mode NAT, in network namespaces.

The agent runs as it does on a node: unprivileged (here `nobody`, with no
groups), QEMU under it with `-sandbox on`. Bridged NICs get their taps from
the root tap helper behind its unix socket, run per connection as systemd's
appliance-tap-helper.socket runs it on the node (systemd-socket-activate
--accept --inetd stands in for systemd here). Addresses come from a dnsmasq
on the bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_process import AgentProcess
from helpers.netns import (
    PYTHON_ENV,
    SYSTEM_PYTHON,
    Namespace,
    network_namespace,
    unprivileged_wrapper,
    veth_to,
)
from helpers.tiny_guest import TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

from appliance.agent.nics import tap_name

pytestmark = pytest.mark.slow

DEADLINE = 240.0
BRIDGE = "brguest"
NOBODY = 65534
SERVER_MAC = "52:54:00:aa:00:02"
SERVER_ADDRESS = "10.77.0.20"
PORT = 7777


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A directory the unprivileged agent can reach (pytest's own are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="appliance-net-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Node:
    namespace: Namespace
    agent: AgentProcess
    state_dir: Path

    def console(self, name: str) -> str:
        text: str = self.agent.result("guest.console", {"name": name, "max_bytes": 65536})["text"]
        return text

    def wait_console(self, name: str, wanted: str) -> None:
        try:
            wait_until(lambda: wanted in self.console(name), DEADLINE, f"{wanted!r} on {name}'s console")
        except AssertionError as error:
            raise AssertionError(f"{error}; its console ends:\n{self.console(name)[-1500:]}") from None


def start_node(namespace: Namespace, work_dir: Path, tiny_guest: TinyGuest) -> Node:
    """The agent as nobody inside the namespace, with the tap helper listening and the tiny guest imported."""
    socket_path = work_dir / "tap-helper.sock"
    config = work_dir / "agent.toml"
    config.write_text(f'[network]\nallowed_bridges = ["{BRIDGE}"]\ntap_helper_socket = "{socket_path}"\n')
    namespace.tap_helper(socket_path, config)
    state_dir = work_dir / "state"
    state_dir.mkdir()
    os.chown(state_dir, NOBODY, NOBODY)
    agent = AgentProcess(
        state_dir, config=config, wrapper=unprivileged_wrapper(namespace, NOBODY), python=SYSTEM_PYTHON, env=PYTHON_ENV
    )
    assert "result" in agent.import_image("tiny-vmlinuz", tiny_guest.kernel.read_bytes())
    assert "result" in agent.import_image("tiny-initrd", tiny_guest.initrd.read_bytes())
    return Node(namespace, agent, state_dir)


def end_node(node: Node) -> None:
    """Every QEMU the agent started is killed (by its pid file) before the namespace goes."""
    for pid_file in node.state_dir.glob("guests/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    node.agent.kill()


@pytest.fixture
def bridged_node(work_dir: Path, tiny_guest: TinyGuest) -> Iterator[Node]:
    """A namespace with a bridge, dnsmasq on it (the server guest's MAC pinned to SERVER_ADDRESS)."""
    with network_namespace("guestnet") as namespace:
        namespace.add_bridge(BRIDGE, "10.77.0.1/24")
        namespace.dnsmasq(
            BRIDGE, "10.77.0.50,10.77.0.99,255.255.255.0,10m", [f"{SERVER_MAC},{SERVER_ADDRESS}"], work_dir / "dhcp.log"
        )
        node = start_node(namespace, work_dir, tiny_guest)
        try:
            yield node
        finally:
            end_node(node)


def tiny_guest_params(tiny_guest: TinyGuest, name: str, nics: Any, extra_cmdline: str = "") -> dict[str, Any]:
    """The tiny guest with these NICs; its seed names its host after the guest (it answers with the name)."""
    return {
        "name": name,
        "cloud_init": {"hostname": name},
        "vcpus": 1,
        "memory_mib": 256,
        "nics": nics,
        "kernel_boot": {
            "kernel_image": "tiny-vmlinuz",
            "initrd_image": "tiny-initrd",
            "cmdline": f"{tiny_guest.cmdline} {extra_cmdline}".strip(),
        },
    }


def test_two_guests_on_a_bridge_reach_each_other_and_their_taps_go_with_qemu(
    bridged_node: Node, tiny_guest: TinyGuest
) -> None:
    node = bridged_node
    server = node.agent.result(
        "guest.create",
        tiny_guest_params(tiny_guest, "server", [{"bridge": BRIDGE, "mac": SERVER_MAC}], f"tiny.serve={PORT}"),
    )
    client = node.agent.result(
        "guest.create",
        tiny_guest_params(tiny_guest, "client", [{"bridge": BRIDGE}], f"tiny.connect={SERVER_ADDRESS}:{PORT}"),
    )
    assert server["nics"] == [{"user": False, "bridge": BRIDGE, "vlan": 0, "mac": SERVER_MAC, "model": "virtio"}]
    client_mac = client["nics"][0]["mac"]
    # Derived: locally administered, unicast, and the same for the same node, guest and NIC.
    assert int(client_mac[:2], 16) & 0x03 == 0x02

    node.agent.result("guest.start", {"name": "server"})
    node.agent.result("guest.start", {"name": "client"})
    server_tap, client_tap = tap_name("server", 0), tap_name("client", 0)
    taps = sorted([server_tap, client_tap])
    assert node.namespace.bridge_ports(BRIDGE) == taps
    # QEMU runs as the agent's user, not as root, and still got its tap.
    assert node.agent.result("guest.info", {"name": "client"})["user"] == "nobody"

    node.wait_console("server", f"tiny-address eth0 {SERVER_ADDRESS}")
    node.wait_console("client", "tiny-address eth0 10.77.0.")
    node.wait_console("client", "tiny-got tiny-hello from server")
    node.wait_console("server", "tiny-served")

    report = node.agent.result("host.report")
    assert {"name": BRIDGE, "vlan_filtering": False, "ports": taps, "mtu": 1500, "vlans": {}} in report["bridges"]

    # A clean stop (ACPI power-down) and a QEMU killed outright both take the guest's tap away.
    assert node.agent.result("guest.stop", {"name": "server", "timeout": 60}) == {"name": "server", "forced": False}
    wait_until(lambda: node.namespace.bridge_ports(BRIDGE) == [client_tap], 30, "the server's tap to go")
    os.kill(node.agent.result("guest.info", {"name": "client"})["pid"], signal.SIGKILL)
    wait_until(lambda: not {server_tap, client_tap} & set(node.namespace.links()), 30, "the taps to go after kill -9")

    # The guest starts again with the same tap name: nothing was left behind to collide with.
    node.agent.result("guest.start", {"name": "server"})
    assert node.namespace.bridge_ports(BRIDGE) == [server_tap]


def test_bridged_nic_refusals_name_the_field(bridged_node: Node, tiny_guest: TinyGuest) -> None:
    node = bridged_node
    reply = node.agent.call("guest.create", tiny_guest_params(tiny_guest, "g", [{"bridge": "nosuchbr"}]))
    assert reply["error"]["data"] == {"code": "invalid_params", "field": "nics[0].bridge"}
    assert BRIDGE in reply["error"]["message"]
    reply = node.agent.call("guest.create", tiny_guest_params(tiny_guest, "g", [{"bridge": BRIDGE, "vlan": 10}]))
    assert reply["error"]["data"] == {"code": "invalid_params", "field": "nics[0].vlan"}
    assert "VLAN-aware" in reply["error"]["message"]
    node.agent.result("guest.create", tiny_guest_params(tiny_guest, "first", [{"bridge": BRIDGE, "mac": SERVER_MAC}]))
    reply = node.agent.call(
        "guest.create", tiny_guest_params(tiny_guest, "second", [{"bridge": BRIDGE, "mac": SERVER_MAC}])
    )
    assert reply["error"]["data"] == {"code": "invalid_params", "field": "nics[0].mac"}
    assert "'first'" in reply["error"]["message"]
    assert [guest["name"] for guest in node.agent.result("guest.list")] == ["first"]


@pytest.fixture
def nat_node(work_dir: Path, tiny_guest: TinyGuest) -> Iterator[Node]:
    """A node namespace whose default route leads to an "outside" namespace; a service on the node's
    loopback (port 4444) and one outside (port 5555)."""
    with network_namespace("guestnat") as namespace, network_namespace("outside") as outside:
        uplink, peer = veth_to(namespace, outside, "uplink")
        namespace.ip("addr", "add", "10.78.0.1/24", "dev", uplink)
        namespace.ip("route", "add", "default", "via", "10.78.0.9")
        outside.ip("addr", "add", "10.78.0.9/24", "dev", peer)
        namespace.listen("127.0.0.1", 4444, "node-loopback")
        outside.listen("0.0.0.0", 5555, "outside")
        node = start_node(namespace, work_dir, tiny_guest)
        try:
            yield node
        finally:
            end_node(node)


def probes(console: str, target: str, state: str) -> int:
    return console.count(f"tiny-probe {target} {state}")


def test_user_mode_nat_reaches_the_outside_but_nothing_on_the_nodes_loopback(
    nat_node: Node, tiny_guest: TinyGuest
) -> None:
    """The gateway address (which QEMU's slirp, and passt by default, map to the node's 127.0.0.1) and
    slirp's host alias 10.0.2.2 are both tried on the port the node's loopback listens on."""
    node = nat_node
    gateway, alias, outside = "10.78.0.9:4444", "10.0.2.2:4444", "10.78.0.9:5555"
    # A count of NICs, as older clients send: that many user-mode NICs.
    params = tiny_guest_params(tiny_guest, "natted", 1, f"tiny.probe={gateway} tiny.probe={alias} tiny.probe={outside}")
    created = node.agent.result("guest.create", params)
    assert [nic["user"] for nic in created["nics"]] == [True]
    node.agent.result("guest.start", {"name": "natted"})

    node.wait_console("natted", f"tiny-probe {outside} open")
    wait_until(
        lambda: min(probes(node.console("natted"), target, "closed") for target in (gateway, alias)) >= 3,
        DEADLINE,
        "three tries of each of the node's loopback routes",
    )
    console = node.console("natted")
    assert probes(console, gateway, "open") == 0 and probes(console, alias, "open") == 0, console[-1500:]
    # passt (--one-off) goes with QEMU.
    directory = node.state_dir / "guests" / "natted"
    assert passt_running(directory)
    node.agent.result("guest.kill", {"name": "natted"})
    wait_until(lambda: not passt_running(directory), 30, "passt to end with QEMU")


def passt_running(guest_dir: Path) -> bool:
    """A passt whose log is in the guest's directory (the launcher starts it with --log-file there)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if words and words[0].endswith(b"passt") and any(str(guest_dir).encode() in word for word in words):
            return True
    return False
