"""Network configuration from a provisioner (cloud-init v1 or v2, OpenStack network_data.json) to systemd-networkd.

What is read: NICs matched by MAC or name, static addresses and DHCP, gateways,
routes, DNS servers and search domains, MTU, VLANs, bonds (mode and the usual
parameters) and bridges. Anything else is returned by its key path as
unsupported, so the node can say so instead of dropping it. The files go to
/run/systemd/network as 10-appliance-firstboot-NAME.{network,netdev}, ahead of
the image's DHCP-on-every-NIC default (80-appliance-wired.network).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "10-appliance-firstboot-"
IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
BOND_PARAMETERS = {
    # v2 name -> networkd [Bond] setting
    "mode": "Mode",
    "mii-monitor-interval": "MIIMonitorSec",
    "lacp-rate": "LACPTransmitRate",
    "transmit-hash-policy": "TransmitHashPolicy",
    "primary": "",  # set on the member's .network as PrimarySlave=yes
    "up-delay": "UpDelaySec",
    "down-delay": "DownDelaySec",
}


class NetworkConfigError(ValueError):
    """The configuration cannot be used at all (not a mapping, an unknown version)."""


@dataclass
class Interface:
    name: str
    kind: str  # "ethernet", "bond", "vlan", "bridge"
    match_mac: str = ""
    match_name: str = ""
    mtu: int = 0
    dhcp4: bool = False
    dhcp6: bool = False
    addresses: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    routes: list[tuple[str, str, int]] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    vlan_id: int = 0
    link: str = ""  # a VLAN's parent
    members: list[str] = field(default_factory=list)  # a bond's or bridge's
    bond: dict[str, str] = field(default_factory=dict)
    primary: str = ""


@dataclass
class Parsed:
    interfaces: dict[str, Interface] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    global_dns: list[str] = field(default_factory=list)
    global_search: list[str] = field(default_factory=list)


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def with_prefix(address: str, netmask: object = None) -> str:
    """10.0.0.5 + 255.255.255.0 -> 10.0.0.5/24; an address with a prefix stays as it is."""
    if "/" in address:
        return str(ipaddress.ip_interface(address))
    if netmask:
        return str(ipaddress.ip_interface(f"{address}/{netmask}"))
    return str(ipaddress.ip_interface(address))


def parse(config: Any) -> Parsed:
    """A network-config document (v1 or v2, optionally under a top-level `network:`)."""
    if isinstance(config, dict) and set(config) == {"network"}:
        config = config["network"]
    if not isinstance(config, dict):
        raise NetworkConfigError("network-config is not a mapping")
    version = config.get("version")
    if version == 1:
        return parse_v1(config)
    if version == 2:
        return parse_v2(config)
    raise NetworkConfigError(f"network-config version {version!r}: versions 1 and 2 are read")


V2_COMMON = {"match", "set-name", "mtu", "dhcp4", "dhcp6", "addresses", "gateway4", "gateway6", "routes", "nameservers",
             "optional", "renderer", "critical", "dhcp-identifier", "macaddress"}  # fmt: skip
V2_IGNORED = {"optional", "renderer", "critical", "dhcp-identifier"}


def parse_v2(config: dict[str, Any]) -> Parsed:
    parsed = Parsed()
    known = {"version", "ethernets", "vlans", "bonds", "bridges", "renderer"}
    parsed.unsupported += [f"network.{key}" for key in config if key not in known]
    for section, kind in (("ethernets", "ethernet"), ("bonds", "bond"), ("bridges", "bridge"), ("vlans", "vlan")):
        for name, settings in (config.get(section) or {}).items():
            path = f"network.{section}.{name}"
            if not isinstance(settings, dict) or not IFNAME.fullmatch(str(name)):
                parsed.unsupported.append(path)
                continue
            interface = Interface(name=str(name), kind=kind)
            extra = {"ethernet": set(), "bond": {"interfaces", "parameters"}, "bridge": {"interfaces", "parameters"},
                     "vlan": {"id", "link"}}[kind]  # fmt: skip
            for key in settings:
                if key not in V2_COMMON | extra:
                    parsed.unsupported.append(f"{path}.{key}")
            read_v2_common(interface, settings, path, parsed)
            if kind == "vlan":
                interface.vlan_id = int(settings.get("id", 0))
                interface.link = str(settings.get("link", ""))
            if kind in ("bond", "bridge"):
                interface.members = [str(member) for member in as_list(settings.get("interfaces"))]
                parameters = settings.get("parameters") or {}
                for key, value in parameters.items():
                    setting = BOND_PARAMETERS.get(key) if kind == "bond" else None
                    if key == "primary" and kind == "bond":
                        interface.primary = str(value)
                    elif setting:
                        interface.bond[setting] = str(value) if key != "mii-monitor-interval" else f"{value}ms"
                    else:
                        parsed.unsupported.append(f"{path}.parameters.{key}")
            parsed.interfaces[interface.name] = interface
    return parsed


def read_v2_common(interface: Interface, settings: dict[str, Any], path: str, parsed: Parsed) -> None:
    match = settings.get("match") or {}
    for key, value in match.items():
        if key == "macaddress" and MAC.fullmatch(str(value)):
            interface.match_mac = str(value).lower()
        elif key == "name":
            interface.match_name = str(value)
        else:
            parsed.unsupported.append(f"{path}.match.{key}")
    if interface.kind == "ethernet" and not match:
        interface.match_name = interface.name
    if "set-name" in settings:
        parsed.unsupported.append(f"{path}.set-name")
    interface.mtu = int(settings.get("mtu") or 0)
    interface.dhcp4 = bool(settings.get("dhcp4"))
    interface.dhcp6 = bool(settings.get("dhcp6"))
    interface.addresses = [with_prefix(str(address)) for address in as_list(settings.get("addresses"))]
    interface.gateways = [str(settings[key]) for key in ("gateway4", "gateway6") if settings.get(key)]
    for index, route in enumerate(as_list(settings.get("routes"))):
        if not isinstance(route, dict) or "to" not in route:
            parsed.unsupported.append(f"{path}.routes[{index}]")
            continue
        to = "0.0.0.0/0" if route["to"] == "default" else str(route["to"])
        interface.routes.append((to, str(route.get("via", "")), int(route.get("metric") or 0)))
    servers = settings.get("nameservers") or {}
    interface.dns = [str(server) for server in as_list(servers.get("addresses"))]
    interface.search = [str(domain) for domain in as_list(servers.get("search"))]


def parse_v1(config: dict[str, Any]) -> Parsed:
    parsed = Parsed()
    for index, entry in enumerate(as_list(config.get("config"))):
        path = f"network.config[{index}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "nameserver":
            parsed.global_dns += [str(address) for address in as_list(entry.get("address"))]
            parsed.global_search += [str(domain) for domain in as_list(entry.get("search"))]
            continue
        if kind == "route":
            parsed.unsupported.append(f"{path} (a global route: give it on an interface's subnet)")
            continue
        mapped = {"physical": "ethernet", "bond": "bond", "vlan": "vlan", "bridge": "bridge"}.get(str(kind))
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if mapped is None or not IFNAME.fullmatch(name):
            parsed.unsupported.append(path)
            continue
        interface = Interface(name=name, kind=mapped)
        mac = str(entry.get("mac_address") or "")
        if mapped == "ethernet":
            if MAC.fullmatch(mac):
                interface.match_mac = mac.lower()
            else:
                interface.match_name = name
        interface.mtu = int(entry.get("mtu") or 0)
        if mapped == "vlan":
            interface.vlan_id = int(entry.get("vlan_id", 0))
            interface.link = str(entry.get("vlan_link", ""))
        if mapped == "bond":
            interface.members = [str(member) for member in as_list(entry.get("bond_interfaces"))]
            for key, value in (entry.get("params") or {}).items():
                setting = BOND_PARAMETERS.get(
                    key.removeprefix("bond-").replace("_", "-").replace("miimon", "mii-monitor-interval")
                )
                if setting:
                    interface.bond[setting] = str(value) if setting != "MIIMonitorSec" else f"{value}ms"
                else:
                    parsed.unsupported.append(f"{path}.params.{key}")
        if mapped == "bridge":
            interface.members = [str(member) for member in as_list(entry.get("bridge_interfaces"))]
        for number, subnet in enumerate(as_list(entry.get("subnets"))):
            read_v1_subnet(interface, subnet, f"{path}.subnets[{number}]", parsed)
        known = {"type", "name", "mac_address", "mtu", "subnets", "vlan_id", "vlan_link", "bond_interfaces", "params",
                 "bridge_interfaces"}  # fmt: skip
        parsed.unsupported += [f"{path}.{key}" for key in entry if key not in known]
        parsed.interfaces[name] = interface
    return parsed


def read_v1_subnet(interface: Interface, subnet: Any, path: str, parsed: Parsed) -> None:
    kind = subnet.get("type") if isinstance(subnet, dict) else None
    if kind in ("dhcp", "dhcp4"):
        interface.dhcp4 = True
    elif kind == "dhcp6":
        interface.dhcp6 = True
    elif kind in ("static", "static6"):
        interface.addresses.append(with_prefix(str(subnet["address"]), subnet.get("netmask") or subnet.get("prefix")))
        if subnet.get("gateway"):
            interface.gateways.append(str(subnet["gateway"]))
        interface.dns += [str(server) for server in as_list(subnet.get("dns_nameservers"))]
        interface.search += [str(domain) for domain in as_list(subnet.get("dns_search"))]
        for route in as_list(subnet.get("routes")):
            to = (
                with_prefix(str(route.get("network")), route.get("netmask"))
                if route.get("netmask")
                else str(route.get("network"))
            )
            interface.routes.append((to, str(route.get("gateway", "")), int(route.get("metric") or 0)))
    else:
        parsed.unsupported.append(path)


def parse_openstack(data: Any) -> Parsed:
    """ConfigDrive's openstack/latest/network_data.json."""
    if not isinstance(data, dict):
        raise NetworkConfigError("network_data.json is not an object")
    parsed = Parsed()
    links: dict[str, Interface] = {}
    for index, link in enumerate(as_list(data.get("links"))):
        kind = {"phy": "ethernet", "ethernet": "ethernet", "bond": "bond", "vlan": "vlan"}.get(str(link.get("type")))
        if kind is None:
            parsed.unsupported.append(f"links[{index}] (type {link.get('type')})")
            continue
        identifier = str(link.get("id"))
        name = identifier if IFNAME.fullmatch(identifier) else f"link{index}"
        interface = Interface(name=name, kind=kind, mtu=int(link.get("mtu") or 0))
        mac = str(link.get("ethernet_mac_address") or "")
        if kind == "ethernet":
            if MAC.fullmatch(mac):
                interface.match_mac = mac.lower()
            else:
                interface.match_name = name
        if kind == "vlan":
            interface.vlan_id = int(link.get("vlan_id", 0))
            interface.link = str(link.get("vlan_link", ""))
        if kind == "bond":
            interface.members = [str(member) for member in as_list(link.get("bond_links"))]
            if link.get("bond_mode"):
                interface.bond["Mode"] = str(link["bond_mode"])
        links[identifier] = interface
    for index, network in enumerate(as_list(data.get("networks"))):
        found = links.get(str(network.get("link")))
        kind = str(network.get("type"))
        if found is None:
            parsed.unsupported.append(f"networks[{index}] (no link {network.get('link')})")
            continue
        interface = found
        if kind in ("ipv4_dhcp", "dhcp4"):
            interface.dhcp4 = True
        elif kind in ("ipv6_dhcp", "ipv6_dhcpv6-stateful", "ipv6_dhcpv6-stateless", "ipv6_slaac"):
            interface.dhcp6 = True
        elif kind in ("ipv4", "ipv6"):
            interface.addresses.append(with_prefix(str(network["ip_address"]), network.get("netmask")))
            for route in as_list(network.get("routes")):
                to = with_prefix(str(route.get("network")), route.get("netmask"))
                if to in ("0.0.0.0/0", "::/0"):
                    interface.gateways.append(str(route.get("gateway")))
                else:
                    interface.routes.append((to, str(route.get("gateway", "")), 0))
        else:
            parsed.unsupported.append(f"networks[{index}] (type {kind})")
    for service in as_list(data.get("services")):
        if service.get("type") == "dns":
            parsed.global_dns.append(str(service.get("address")))
    # Members and parents are named by link id in the file; by interface name here.
    names = {identifier: interface.name for identifier, interface in links.items()}
    for interface in links.values():
        interface.members = [names.get(member, member) for member in interface.members]
        interface.link = names.get(interface.link, interface.link)
        parsed.interfaces[interface.name] = interface
    return parsed


def render(parsed: Parsed) -> dict[str, str]:
    """File name -> contents, for /run/systemd/network."""
    files: dict[str, str] = {}
    owner = {member: interface for interface in parsed.interfaces.values() for member in interface.members}
    vlans_on: dict[str, list[str]] = {}
    for interface in parsed.interfaces.values():
        if interface.kind == "vlan":
            vlans_on.setdefault(interface.link, []).append(interface.name)
    dns_given = any(interface.dns for interface in parsed.interfaces.values())
    for interface in parsed.interfaces.values():
        if interface.kind != "ethernet":
            files[f"{PREFIX}{interface.name}.netdev"] = netdev(interface)
        lines = ["[Match]"]
        if interface.match_mac:
            lines.append(f"MACAddress={interface.match_mac}")
        else:
            lines.append(f"Name={interface.match_name or interface.name}")
        if interface.kind == "ethernet":
            lines.append("Type=ether")
        lines += ["", "[Link]", "RequiredForOnline=no"]
        if interface.mtu:
            lines.append(f"MTUBytes={interface.mtu}")
        lines += ["", "[Network]"]
        parent = owner.get(interface.name)
        if parent is not None:
            lines.append(f"{'Bond' if parent.kind == 'bond' else 'Bridge'}={parent.name}")
            if parent.primary == interface.name:
                lines.append("PrimarySlave=yes")
        else:
            dhcp = (
                "yes"
                if interface.dhcp4 and interface.dhcp6
                else "ipv4"
                if interface.dhcp4
                else "ipv6"
                if interface.dhcp6
                else "no"
            )
            lines.append(f"DHCP={dhcp}")
            lines.append("LinkLocalAddressing=ipv6")
            lines += [f"Address={address}" for address in interface.addresses]
            lines += [f"Gateway={gateway}" for gateway in interface.gateways]
            dns = interface.dns or ([] if dns_given else parsed.global_dns)
            lines += [f"DNS={server}" for server in dns]
            domains = interface.search or ([] if dns_given else parsed.global_search)
            if domains:
                lines.append(f"Domains={' '.join(domains)}")
        lines += [f"VLAN={name}" for name in vlans_on.get(interface.name, [])]
        for to, via, metric in interface.routes:
            lines += ["", "[Route]", f"Destination={to}"]
            if via:
                lines.append(f"Gateway={via}")
            if metric:
                lines.append(f"Metric={metric}")
        files[f"{PREFIX}{interface.name}.network"] = "\n".join(lines) + "\n"
    return files


def netdev(interface: Interface) -> str:
    lines = ["[NetDev]", f"Name={interface.name}", f"Kind={interface.kind}"]
    if interface.mtu:
        lines.append(f"MTUBytes={interface.mtu}")
    if interface.kind == "vlan":
        lines += ["", "[VLAN]", f"Id={interface.vlan_id}"]
    if interface.kind == "bond" and interface.bond:
        lines += ["", "[Bond]", *(f"{key}={value}" for key, value in interface.bond.items())]
    return "\n".join(lines) + "\n"


def describe(parsed: Parsed) -> list[str]:
    """One line per interface: what the node will do with it."""
    out = []
    for interface in parsed.interfaces.values():
        how = [*interface.addresses]
        if interface.dhcp4 or interface.dhcp6:
            how.append("DHCP")
        if interface.kind == "vlan":
            how.append(f"VLAN {interface.vlan_id} on {interface.link}")
        if interface.members:
            how.append(f"{interface.kind} of {', '.join(interface.members)}")
        target = interface.match_mac or interface.match_name or interface.name
        out.append(f"{interface.name} ({target}): {', '.join(how) or 'no address'}")
    return out
