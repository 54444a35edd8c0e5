"""The [network] table: bridges, bonds, the node's own address; every problem named by its key."""

from __future__ import annotations

import pytest

from appliance.network import FIRST_WIRED, Bond, Bridge, Management, Network
from appliance.spec import SpecError, parse_spec


def problems(text: str) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "t")
    return {problem.key: problem.allowed for problem in caught.value.problems}


def test_the_default_is_one_bridge_over_the_first_wired_nic_with_dhcp() -> None:
    network = parse_spec("", "default").network
    assert network == Network(bridges=(Bridge("br0", (FIRST_WIRED,)),), bonds=(), management=Management())
    assert network.management.dhcp and network.management.interface == "br0"


def test_a_bond_under_a_vlan_aware_bridge_with_a_static_address_on_a_vlan() -> None:
    network = parse_spec(
        "[network]\n"
        'bridges = [{ name = "vmbr0", ports = ["bond0"], vlan_aware = true }]\n'
        'bonds = [{ name = "bond0", mode = "802.3ad", ports = ["eno1", "eno2"] }]\n'
        'management = { interface = "vmbr0", vlan = 10, dhcp = false, address = "192.0.2.10/24", '
        'gateway = "192.0.2.1", dns = ["192.0.2.53"] }\n',
        "t",
    ).network
    assert network.bridges == (Bridge("vmbr0", ("bond0",), vlan_aware=True),)
    assert network.bonds == (Bond("bond0", "802.3ad", ("eno1", "eno2")),)
    assert network.management == Management("vmbr0", 10, False, "192.0.2.10/24", "192.0.2.1", ("192.0.2.53",))


@pytest.mark.parametrize(
    ("table", "key", "allowed"),
    [
        ('bridges = [{ name = "br0", ports = [] }]', "network.bridges[0].ports", "a non-empty list"),
        ('bridges = [{ name = "br 0", ports = ["eth0"] }]', "network.bridges[0].name", "an interface name"),
        ('bridges = [{ name = "br0", ports = ["eth0"], stp = true }]', "network.bridges[0].stp", "unknown key"),
        ('bridges = [{ name = "br0", ports = ["eth0;x"] }]', "network.bridges[0].ports[0]", "NIC names or globs"),
        ('bonds = [{ name = "bond0", mode = "balance-rr", ports = ["eth0"] }]', "network.bonds[0].mode", "one of"),
        ('bonds = [{ name = "bond0", ports = ["eth1"] }]', "network.bonds", "a bond must be a bridge's port"),
        ("management = { vlan = 10 }", "network.management.vlan", "VLAN-aware bridge"),
        ("management = { vlan = 4095 }", "network.management.vlan", "from 1 to 4094"),
        ("management = { dhcp = false }", "network.management.address", "needed when dhcp = false"),
        ('management = { dhcp = false, address = "192.0.2.10" }', "network.management.address", "with its prefix"),
        (
            'management = { dhcp = false, address = "192.0.2.10/24", gateway = "198.51.100.1" }',
            "network.management.gateway",
            "must be inside 192.0.2.0/24",
        ),
        ('management = { dns = ["resolver"] }', "network.management.dns[0]", "an IP address"),
        ('management = { address = "192.0.2.10/24" }', "network.management.dhcp", "false when an address"),
    ],
)
def test_bad_network_tables_name_the_key_and_what_is_allowed(table: str, key: str, allowed: str) -> None:
    found = problems(f"[network]\n{table}\n")
    assert key in found and allowed in found[key], found


def test_a_nic_in_two_places_or_a_name_used_twice_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(
            "[network]\n"
            'bridges = [{ name = "br0", ports = ["eth0"] }, { name = "br1", ports = ["eth0", "first-wired"] },'
            ' { name = "br0", ports = ["first-wired"] }]\n',
            "t",
        )
    found = [(problem.key, problem.allowed) for problem in caught.value.problems]
    assert found.count(("network", "each bridge and bond needs a name of its own")) == 1
    assert ("network", "a port of both br0 and br1: a NIC joins one of them") in found
    assert ("network.bridges", "names one NIC: give it to one bridge") in found
