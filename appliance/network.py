"""The [network] table of appliance.toml: the node's bridges, bonds and its own address.

Parsed here (every problem collected with its key path, as spec.py does for
the rest), rendered into systemd-networkd units by build/render.py from
templates/network/. The default is what Proxmox's installer does: one bridge
br0 over the first wired NIC, the node's DHCP on br0, so guests land on the
node's LAN with no configuration.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

FIRST_WIRED = "first-wired"
INTERFACE_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
# A NIC port: an interface name, or a glob networkd matches (en*, eth[01]).
PORT_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]][A-Za-z0-9_.*?\[\]-]{0,14}")
BOND_MODES = ("active-backup", "802.3ad")
MAX_VLAN = 4094


class ProblemSink(Protocol):
    """Where a problem goes: spec.py's Problem list, through its constructor."""

    def __call__(self, key: str, value: object, allowed: str) -> None: ...


@dataclass(frozen=True)
class Bridge:
    name: str
    ports: tuple[str, ...]
    vlan_aware: bool = False


@dataclass(frozen=True)
class Bond:
    name: str
    mode: str
    ports: tuple[str, ...]


@dataclass(frozen=True)
class Management:
    """The node's own address: on an interface, optionally on one VLAN of a VLAN-aware bridge."""

    interface: str = "br0"
    vlan: int = 0
    dhcp: bool = True
    address: str = ""  # CIDR, when not DHCP
    gateway: str = ""
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Network:
    bridges: tuple[Bridge, ...] = (Bridge("br0", (FIRST_WIRED,)),)
    bonds: tuple[Bond, ...] = ()
    management: Management = field(default_factory=Management)

    def bridge(self, name: str) -> Bridge | None:
        return next((bridge for bridge in self.bridges if bridge.name == name), None)

    @property
    def bond_names(self) -> set[str]:
        return {bond.name for bond in self.bonds}


def table_entries(value: object, path: str, problem: ProblemSink, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """A list of tables, each with its key path (network.bridges[0]); anything else is a problem."""
    if not isinstance(value, list):
        problem(path, value, f"must be a list of {kind} tables")
        return []
    entries = []
    for index, entry in enumerate(value):
        where = f"{path}[{index}]"
        if isinstance(entry, dict):
            entries.append((where, entry))
        else:
            problem(where, entry, f"must be a {kind} table")
    return entries


def refuse_unknown(entry: dict[str, Any], where: str, known: tuple[str, ...], problem: ProblemSink) -> None:
    for key, value in entry.items():
        if key not in known:
            problem(f"{where}.{key}", value, f"unknown key; known keys here: {', '.join(known)}")


def interface_name(value: object, where: str, problem: ProblemSink) -> str:
    if not isinstance(value, str) or not INTERFACE_PATTERN.fullmatch(value):
        problem(where, value, "an interface name: 1-15 letters, digits, '_', '.', '-'")
        return ""
    return value


def port_list(value: object, where: str, problem: ProblemSink) -> tuple[str, ...]:
    allowed = f'NIC names or globs (eth0, en*), a bond\'s name, or "{FIRST_WIRED}"'
    if not isinstance(value, list) or not value:
        problem(where, value, f"a non-empty list of {allowed}")
        return ()
    for index, port in enumerate(value):
        if not isinstance(port, str) or not (port == FIRST_WIRED or PORT_PATTERN.fullmatch(port)):
            problem(f"{where}[{index}]", port, allowed)
    return tuple(str(port) for port in value)


def parse_bridges(value: object, path: str, problem: ProblemSink) -> tuple[Bridge, ...]:
    bridges = []
    for where, entry in table_entries(value, path, problem, "bridge"):
        refuse_unknown(entry, where, ("name", "ports", "vlan_aware"), problem)
        vlan_aware = entry.get("vlan_aware", False)
        if not isinstance(vlan_aware, bool):
            problem(f"{where}.vlan_aware", vlan_aware, "must be true or false")
        bridges.append(
            Bridge(
                name=interface_name(entry.get("name"), f"{where}.name", problem),
                ports=port_list(entry.get("ports"), f"{where}.ports", problem),
                vlan_aware=vlan_aware is True,
            )
        )
    return tuple(bridges)


def parse_bonds(value: object, path: str, problem: ProblemSink) -> tuple[Bond, ...]:
    bonds = []
    for where, entry in table_entries(value, path, problem, "bond"):
        refuse_unknown(entry, where, ("name", "mode", "ports"), problem)
        mode = entry.get("mode", "active-backup")
        if mode not in BOND_MODES:
            problem(f"{where}.mode", mode, f"one of {', '.join(BOND_MODES)}")
        ports = port_list(entry.get("ports"), f"{where}.ports", problem)
        if FIRST_WIRED in ports:
            problem(f"{where}.ports", list(ports), f'NIC names or globs; "{FIRST_WIRED}" is for a bridge')
        bonds.append(
            Bond(name=interface_name(entry.get("name"), f"{where}.name", problem), mode=str(mode), ports=ports)
        )
    return tuple(bonds)


def parse_management(value: object, path: str, problem: ProblemSink) -> Management:
    if not isinstance(value, dict):
        problem(path, value, "must be a table: { interface = ..., dhcp = ..., ... }")
        return Management()
    known = ("interface", "vlan", "dhcp", "address", "gateway", "dns")
    refuse_unknown(value, path, known, problem)
    defaults = Management()
    vlan = value.get("vlan", defaults.vlan)
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= MAX_VLAN:
        problem(f"{path}.vlan", vlan, f"0 (none) or a VLAN id from 1 to {MAX_VLAN}")
        vlan = 0
    dhcp = value.get("dhcp", defaults.dhcp)
    if not isinstance(dhcp, bool):
        problem(f"{path}.dhcp", dhcp, "must be true or false")
        dhcp = True
    address = checked_text(
        value, "address", path, problem, check_cidr, "an address with its prefix, e.g. 192.0.2.10/24"
    )
    gateway = checked_text(value, "gateway", path, problem, check_ip, "an IP address, e.g. 192.0.2.1")
    dns = value.get("dns", [])
    good_dns: list[str] = []
    if not isinstance(dns, list):
        problem(f"{path}.dns", dns, "a list of IP addresses")
    else:
        for index, server in enumerate(dns):
            if isinstance(server, str) and check_ip(server):
                good_dns.append(server)
            else:
                problem(f"{path}.dns[{index}]", server, "an IP address")
    if not dhcp and not address:
        problem(f"{path}.address", address, "needed when dhcp = false (an address with its prefix)")
    if dhcp and (address or gateway):
        problem(f"{path}.dhcp", dhcp, "false when an address or gateway is given (or leave them empty)")
    return Management(
        interface=interface_name(value.get("interface", defaults.interface), f"{path}.interface", problem),
        vlan=vlan,
        dhcp=dhcp,
        address=address,
        gateway=gateway,
        dns=tuple(good_dns),
    )


def checked_text(
    table: dict[str, Any], key: str, path: str, problem: ProblemSink, check: Callable[[str], bool], allowed: str
) -> str:
    value = table.get(key, "")
    if value == "":
        return ""
    if not isinstance(value, str) or not check(value):
        problem(f"{path}.{key}", value, allowed)
        return ""
    return value


def check_cidr(text: str) -> bool:
    try:
        ipaddress.ip_interface(text)
    except ValueError:
        return False
    return "/" in text


def check_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_network(network: Network, problem: ProblemSink) -> None:
    """What no single key shows: names used twice, a port in two places, a management
    interface or VLAN that does not exist, a gateway outside the address's subnet."""
    names = [bridge.name for bridge in network.bridges] + [bond.name for bond in network.bonds]
    for name in sorted({name for name in names if names.count(name) > 1}):
        problem("network", name, "each bridge and bond needs a name of its own")
    claimed: dict[str, str] = {}
    for owner, ports in [(bridge.name, bridge.ports) for bridge in network.bridges] + [
        (bond.name, bond.ports) for bond in network.bonds
    ]:
        for port in ports:
            if port in claimed:
                problem("network", port, f"a port of both {claimed[port]} and {owner}: a NIC joins one of them")
            claimed[port] = owner
    bridge_ports = {port for bridge in network.bridges for port in bridge.ports}
    for bond in network.bonds:
        if bond.name not in bridge_ports and bond.name != network.management.interface:
            problem("network.bonds", bond.name, "a bond must be a bridge's port or the management interface")
    management = network.management
    # A plain NIC may carry the node's address too, when it is no bridge's or bond's port.
    if management.interface in claimed:
        problem(
            "network.management.interface",
            management.interface,
            f"is a port of {claimed[management.interface]}: put the address on {claimed[management.interface]}",
        )
    if management.vlan:
        bridge = network.bridge(management.interface)
        if bridge is None or not bridge.vlan_aware:
            problem(
                "network.management.vlan", management.vlan, "needs the management interface to be a VLAN-aware bridge"
            )
    if management.address and management.gateway:
        subnet = ipaddress.ip_interface(management.address).network
        if ipaddress.ip_address(management.gateway) not in subnet:
            problem("network.management.gateway", management.gateway, f"must be inside {subnet}")
    if sum(port == FIRST_WIRED for bridge in network.bridges for port in bridge.ports) > 1:
        problem("network.bridges", FIRST_WIRED, "names one NIC: give it to one bridge")
