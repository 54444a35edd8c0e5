"""A bond of the node's two NICs carries br0, nested in QEMU (slow).

The session's test spec with [network] br0 over bond0 (active-backup, the bond
template's MII monitor at 100 ms) of both NICs, the node's DHCP on br0: built
once here (its root comes from the cache the session's build filled; only the
configuration layer differs, so the build takes seconds) and booted once with
two NICs on one QEMU hub (`appliance boot --nics 2`). The active NIC's cable is
pulled through QEMU's monitor (set_link): the node answers new SSH connections
through the other one. The build's and the failover's seconds are printed
(pytest -s). APPLIANCE_TEST_BOND_BUILD=DIR reuses a bond build made earlier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.lifecycle_builds import variant
from helpers.waiting import wait_until
from system.conftest import spec_text_for_tests

from appliance.boot.vm import VmPaths, nic_mac, set_nic_link
from appliance.nodes.client import Node, NodeAddress, NodeError

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900
# From the cable pulled to the node answering through the other NIC: the bond notices within
# 100 ms; the rest is a new SSH connection to a node emulated under TCG on a loaded machine.
FAILOVER_TIMEOUT = 120
FIGURES: dict[str, float] = {}


def bond_spec(test_spec: str) -> str:
    """The test spec with br0 over a bond of both NICs; the ISO alone (all this test boots)."""
    return variant(
        test_spec,
        **{
            'hostname = "appliance"': 'hostname = "appliance-bond"',
            'outputs = ["squashfs", "iso", "disk", "pxe"]': 'outputs = ["squashfs", "iso"]',
            'bridges = [{ name = "br0", ports = ["first-wired"], vlan_aware = true }]':
                'bridges = [{ name = "br0", ports = ["bond0"], vlan_aware = false }]',
            "bonds = []": 'bonds = [{ name = "bond0", mode = "active-backup", ports = ["en*"] }]',
        },
    )  # fmt: skip


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          check=False, timeout=1800)  # fmt: skip


@pytest.fixture(scope="module")
def bond_build(built_appliance: Path, operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built after the session's build (a fixture it needs), whose root image it reuses."""
    reuse = os.environ.get("APPLIANCE_TEST_BOND_BUILD")
    if reuse:
        return Path(reuse)
    directory = tmp_path_factory.mktemp("bond-build")
    spec = directory / "bond.toml"
    spec.write_text(bond_spec(spec_text_for_tests(Path(f"{operator_key}.pub").read_text().strip())))
    started = time.monotonic()
    built = appliance("build", str(spec), "-o", str(directory / "out"), "--authorized-key", f"{operator_key}.pub")
    assert built.returncode == 0, built.stdout + built.stderr
    FIGURES["build_seconds"] = round(time.monotonic() - started, 1)
    print(f"\nbond build: {FIGURES['build_seconds']} s")
    return directory / "out"


@dataclass(frozen=True)
class BondedNode:
    out_dir: Path
    port: int
    key: Path
    known_hosts: Path

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.out_dir / "run")

    def report(self) -> dict[str, Any]:
        """host.report over a new SSH connection."""
        with Node(NodeAddress("127.0.0.1", self.port, "appliance"), self.key, self.known_hosts, timeout=30) as node:
            report: dict[str, Any] = node.call("host.report", idempotent=True)
        return report

    def breakglass(self, command: str) -> str:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes", "-o",
             "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30",
             "breakglass@127.0.0.1", command],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return done.stdout


@pytest.fixture(scope="module")
def node(bond_build: Path, operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BondedNode]:
    result = appliance("boot", str(bond_build), "--wait", "--nics", "2", "--timeout", str(BOOT_TIMEOUT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "network: 2 NICs on one hub" in result.stdout
    port = int((bond_build / "run" / "ssh-port").read_text())
    try:
        yield BondedNode(bond_build, port, operator_key, tmp_path_factory.mktemp("bond") / "known_hosts")
    finally:
        appliance("stop", str(bond_build))


def the_bond(report: dict[str, Any]) -> dict[str, Any]:
    (bond,) = report["bonds"]
    assert bond["name"] == "bond0" and bond["mode"] == "active-backup", bond
    return bond


def nic_index(bond: dict[str, Any], port_name: str) -> int:
    """Which of QEMU's NICs (nic0, nic1) a port of the bond is, by the MAC it came with."""
    (mac,) = [port["mac"] for port in bond["ports"] if port["name"] == port_name]
    return [nic_mac(0), nic_mac(1)].index(mac)


def test_a_bond_of_both_nics_carries_br0_and_the_nodes_address(node: BondedNode) -> None:
    report = node.report()
    (bridge,) = report["bridges"]
    assert bridge["name"] == "br0" and bridge["ports"] == ["bond0"], bridge
    bond = the_bond(report)
    assert sorted(port["mac"] for port in bond["ports"]) == [nic_mac(0), nic_mac(1)]
    assert all(port["name"].startswith("en") and port["link"] == "up" for port in bond["ports"]), bond
    assert bond["active_port"] in [port["name"] for port in bond["ports"]]
    # The node's DHCP went through the bond: QEMU's DHCP server answered on br0.
    assert [address.split(".")[:3] for address in report["addresses"]["br0"]] == [["10", "0", "2"]]
    assert report["network"] == "configured"


def test_the_node_answers_through_the_other_nic_when_the_active_ones_cable_is_pulled(node: BondedNode) -> None:
    bond = the_bond(node.report())
    cut = bond["active_port"]
    (other,) = [port["name"] for port in bond["ports"] if port["name"] != cut]
    index = nic_index(bond, cut)
    started = time.monotonic()
    set_nic_link(node.paths, index, up=False)
    try:

        def failed_over() -> dict[str, Any] | None:
            # A new SSH connection and an agent call each time, through whichever NIC carries the bond.
            try:
                now = the_bond(node.report())
            except NodeError:
                return None
            links = {port["name"]: port["link"] for port in now["ports"]}
            return now if now["active_port"] == other and links[cut] == "down" else None

        wait_until(failed_over, FAILOVER_TIMEOUT, f"the node to answer through {other} with {cut}'s link down")
        FIGURES["failover_seconds"] = round(time.monotonic() - started, 1)
        print(f"\nbond failover: answering through {other} {FIGURES['failover_seconds']} s after {cut}'s link went")
        bonding = node.breakglass("cat /proc/net/bonding/bond0")
        assert f"Currently Active Slave: {other}" in bonding, bonding
        cut_section = bonding.split(f"Slave Interface: {cut}\n", 1)[1]
        assert cut_section.splitlines()[0] == "MII Status: down", bonding
    finally:
        set_nic_link(node.paths, index, up=True)

    def both_up() -> bool:
        return all(port["link"] == "up" for port in the_bond(node.report())["ports"])

    wait_until(both_up, FAILOVER_TIMEOUT, f"{cut}'s link back up in the bond")
