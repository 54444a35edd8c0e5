"""Guest NIC definitions, their MACs, QEMU's arguments for them, and what the root tap helper accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.agent import nics
from appliance.agent.errors import AgentError
from appliance.agent.host import Bond, BondPort, Bridge, read_bonds, read_bridges
from appliance.agent.model import Nic, NicModel, guest_spec_from_json, parse_guest_spec
from appliance.agent.nics import LaunchPlan, NetworkConfig, assign_nics, derive_mac, launch_argv, nic_argv, tap_name
from appliance.agent.taps import Tap, TapError, bridge_commands, parse_request, tap_mac

BASE = {"name": "g1", "vcpus": 1, "memory_mib": 64}
BRIDGES = {
    "br0": Bridge(name="br0", vlan_filtering=False, ports=(), mtu=1500),
    "brvlan": Bridge(name="brvlan", vlan_filtering=True, ports=("eth1",), mtu=9000),
}
CONFIG = NetworkConfig(allowed_bridges=("br0", "brvlan"))


def refused_field(params: dict[str, Any]) -> str:
    with pytest.raises(AgentError) as caught:
        parse_guest_spec({**BASE, **params})
    assert caught.value.code == "invalid_params"
    field: str = caught.value.details["field"]
    return field


def test_nics_parse_bridged_and_user_mode() -> None:
    spec = parse_guest_spec(
        {**BASE, "nics": [{"bridge": "br0", "vlan": 10, "mac": "52:54:00:AB:CD:EF", "model": "e1000"}, {"user": True}]}
    )
    assert spec.nics == (
        Nic(bridge="br0", vlan=10, mac="52:54:00:ab:cd:ef", model=NicModel.E1000),
        Nic(user=True),
    )


def test_a_count_of_nics_is_that_many_user_mode_nics_for_old_clients_and_old_definitions() -> None:
    assert parse_guest_spec({**BASE, "nics": 2}).nics == (Nic(user=True), Nic(user=True))
    stored = {**parse_guest_spec({**BASE, "nics": 1}).to_json(), "nics": 1}
    del stored["cloud_init"]  # stored before cloud-init seeds existed
    assert guest_spec_from_json(stored).nics == (Nic(user=True),)


def test_a_definition_round_trips_through_its_json() -> None:
    spec = parse_guest_spec({**BASE, "nics": [{"bridge": "br0", "mac": "52:54:00:00:00:01"}, {"user": True}]})
    assert guest_spec_from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("nics", "field"),
    [
        ([{"bridge": "br0", "vlan": 0}], "nics[0].vlan"),
        ([{"bridge": "br0", "vlan": 4095}], "nics[0].vlan"),
        ([{"bridge": "br0", "vlan": True}], "nics[0].vlan"),
        ([{"bridge": "br0", "mac": "01:00:5e:00:00:01"}], "nics[0].mac"),  # multicast
        ([{"bridge": "br0", "mac": "52:54:00:zz:00:01"}], "nics[0].mac"),
        ([{"bridge": "br0", "mac": "52-54-00-00-00-01"}], "nics[0].mac"),
        ([{"bridge": "br0", "mac": "00:00:00:00:00:00"}], "nics[0].mac"),
        ([{"bridge": "br0", "model": "ne2k_pci"}], "nics[0].model"),
        ([{"bridge": "../etc"}], "nics[0].bridge"),
        ([{"bridge": "a-bridge-name-too-long"}], "nics[0].bridge"),
        ([{"user": True, "vlan": 5}], "nics[0].vlan"),
        ([{"user": True, "bridge": "br0"}], "nics[0]"),
        ([{}], "nics[0]"),
        ([{"bridge": "br0", "colour": "red"}], "nics[0].colour"),
        ([{"user": True}] * 9, "nics"),
        (9, "nics"),
        ([{"user": True, "mac": "52:54:00:00:00:01"}, {"user": True, "mac": "52:54:00:00:00:01"}], "nics[1].mac"),
    ],
)
def test_bad_nics_are_refused_naming_the_field(nics: object, field: str) -> None:
    assert refused_field({"nics": nics}) == field


def test_derived_macs_are_locally_administered_unicast_and_stable() -> None:
    mac = derive_mac("machine-1", "g1", 0)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert mac == derive_mac("machine-1", "g1", 0)
    assert (
        len({mac, derive_mac("machine-2", "g1", 0), derive_mac("machine-1", "g2", 0), derive_mac("machine-1", "g1", 1)})
        == 4
    )


def assign(params: dict[str, Any], others: list[dict[str, Any]] | None = None) -> tuple[Nic, ...]:
    other_specs = [assign_nics(parse_guest_spec({**BASE, **other}), [], CONFIG, BRIDGES, "m") for other in others or []]
    return assign_nics(parse_guest_spec({**BASE, **params}), other_specs, CONFIG, BRIDGES, "m").nics


def test_every_nic_gets_a_mac_and_a_derived_one_moves_on_from_one_another_guest_has() -> None:
    nics = assign({"nics": [{"bridge": "br0"}, {"user": True}, {"bridge": "br0", "mac": "52:54:00:00:00:07"}]})
    assert nics[0].mac == derive_mac("m", "g1", 0) and nics[1].mac == derive_mac("m", "g1", 1)
    assert nics[2].mac == "52:54:00:00:00:07"
    # Another guest already holds what g1's first NIC would derive: it takes the next attempt's.
    taken = derive_mac("m", "g1", 0)
    nics = assign({"nics": [{"bridge": "br0"}]}, [{"name": "other", "nics": [{"bridge": "br0", "mac": taken}]}])
    assert nics[0].mac == derive_mac("m", "g1", 0, attempt=1)


def node_refusal(params: dict[str, Any], others: list[dict[str, Any]] | None = None) -> AgentError:
    with pytest.raises(AgentError) as caught:
        assign(params, others)
    assert caught.value.code == "invalid_params"
    return caught.value


def test_the_node_refuses_unknown_bridges_listing_its_own_vlans_without_filtering_and_duplicate_macs() -> None:
    error = node_refusal({"nics": [{"bridge": "br9"}]})
    assert error.details["field"] == "nics[0].bridge" and "br0, brvlan" in error.message
    with pytest.raises(AgentError, match="allowed: br0"):
        assign_nics(parse_guest_spec({**BASE, "nics": [{"bridge": "brvlan"}]}), [], NetworkConfig(), BRIDGES, "m")
    error = node_refusal({"nics": [{"bridge": "br0", "vlan": 10}]})
    assert error.details["field"] == "nics[0].vlan" and "VLAN-aware" in error.message
    assert assign({"nics": [{"bridge": "brvlan", "vlan": 10}]})[0].vlan == 10
    error = node_refusal(
        {"nics": [{"user": True, "mac": "52:54:00:00:00:09"}]},
        [{"name": "holder", "nics": [{"bridge": "br0", "mac": "52:54:00:00:00:09"}]}],
    )
    assert error.details["field"] == "nics[0].mac" and "'holder'" in error.message


def test_qemu_arguments_and_the_launch_plan(tmp_path: Path) -> None:
    spec = parse_guest_spec(
        {
            **BASE,
            "nics": [{"bridge": "brvlan", "vlan": 7, "mac": "52:00:00:00:00:01"}, {"user": True, "model": "rtl8139"}],
        }
    )
    argv, plan = nic_argv(spec, tmp_path, CONFIG)
    assert argv == [
        "-netdev", "tap,id=net0,fd=3", "-device", "virtio-net-pci,netdev=net0,mac=52:00:00:00:00:01,romfile=",
        "-netdev", "stream,id=net1,addr.type=fd,addr.str=4", "-device", "rtl8139,netdev=net1,romfile=",
    ]  # fmt: skip
    assert [(tap.fd, tap.ifname, tap.bridge, tap.vlan) for tap in plan.taps] == [(3, tap_name("g1", 0), "brvlan", 7)]
    assert [(passt.fd, passt.log) for passt in plan.passt] == [(4, str(tmp_path / "passt-net1.log"))]
    assert LaunchPlan.from_json(plan.to_json()) == plan
    wrapped = launch_argv(("agent",), plan, ["qemu-system-x86_64", "-m", "64"])
    assert wrapped == ["agent", "launch-guest", plan.to_json(), "--", "qemu-system-x86_64", "-m", "64"]
    # Without NICs that need descriptors, QEMU runs as it is.
    assert launch_argv(("agent",), LaunchPlan(tap_helper_socket="/s"), ["qemu"]) == ["qemu"]


def test_taps_use_vhost_net_where_the_node_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_guest_spec({**BASE, "nics": [{"bridge": "br0"}]})
    monkeypatch.setattr(nics, "VHOST_NET", tmp_path / "vhost-net")
    assert nic_argv(spec, tmp_path, CONFIG)[0][1] == "tap,id=net0,fd=3"
    (tmp_path / "vhost-net").touch(mode=0o600)
    assert nic_argv(spec, tmp_path, CONFIG)[0][1] == "tap,id=net0,fd=3,vhost=on"


def test_tap_names_fit_an_interface_name_and_differ_per_guest_and_nic() -> None:
    names = {tap_name("g1", 0), tap_name("g1", 1), tap_name("g2", 0), tap_name("x" * 63, 7)}
    assert len(names) == 4 and all(len(name) <= 15 for name in names)


def fake_sysfs(root: Path) -> Path:
    for name, filtering in (("br0", "0"), ("brvlan", "1")):
        (root / name / "bridge").mkdir(parents=True)
        (root / name / "bridge" / "vlan_filtering").write_text(filtering + "\n")
        (root / name / "bridge" / "default_pvid").write_text("1\n")
        (root / name / "brif").mkdir()
        (root / name / "mtu").write_text("1500\n")
    (root / "br0" / "brif" / "eth0").mkdir()
    (root / "eth0").mkdir()
    return root


def test_bridges_are_read_from_sysfs(tmp_path: Path) -> None:
    assert read_bridges(fake_sysfs(tmp_path)) == {
        "br0": Bridge(name="br0", vlan_filtering=False, ports=("eth0",), mtu=1500),
        "brvlan": Bridge(name="brvlan", vlan_filtering=True, ports=(), mtu=1500),
    }


def test_bonds_are_read_from_sysfs_with_each_ports_link_and_own_mac(tmp_path: Path) -> None:
    bonding = tmp_path / "bond0" / "bonding"
    bonding.mkdir(parents=True)
    (bonding / "mode").write_text("active-backup 1\n")
    (bonding / "slaves").write_text("enp0s2 enp0s3\n")
    (bonding / "active_slave").write_text("enp0s3\n")
    for name, link, mac in (("enp0s2", "down", "52:54:00:12:34:56"), ("enp0s3", "up", "52:54:00:12:34:57")):
        (tmp_path / name / "bonding_slave").mkdir(parents=True)
        (tmp_path / name / "bonding_slave" / "mii_status").write_text(link + "\n")
        (tmp_path / name / "bonding_slave" / "perm_hwaddr").write_text(mac + "\n")
    fake_sysfs(tmp_path)  # bridges are no bonds
    assert read_bonds(tmp_path) == {
        "bond0": Bond(
            name="bond0",
            mode="active-backup",
            ports=(BondPort("enp0s2", "down", "52:54:00:12:34:56"), BondPort("enp0s3", "up", "52:54:00:12:34:57")),
            active_port="enp0s3",
        )
    }


def helper_request(**changes: object) -> bytes:
    import json

    request: dict[str, object] = {"ifname": tap_name("g1", 0), "bridge": "br0", "vlan": 0, "mac": "52:54:00:00:00:01"}
    return json.dumps({**request, **changes}).encode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bridge": "brother"}, "not allowed"),
        ({"bridge": "brvlan"}, "not allowed"),
        ({"ifname": "eth0"}, "not a guest tap name"),
        ({"ifname": "vm0123456789n0; reboot"}, "not a guest tap name"),
        ({"vlan": 5}, "not VLAN-aware"),
        ({"vlan": 4095}, "vlan must be"),
        ({"mac": "03:00:00:00:00:01"}, "not a unicast MAC"),
        ({"extra": 1}, "exactly"),
    ],
)
def test_the_tap_helper_refuses_what_the_agent_would_not_ask_for(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(TapError, match=message):
        parse_request(helper_request(**changes), NetworkConfig(allowed_bridges=("br0",)), fake_sysfs(tmp_path))


def test_the_tap_helper_puts_the_tap_on_its_bridge_and_vlan(tmp_path: Path) -> None:
    config = NetworkConfig(allowed_bridges=("br0", "brvlan"))
    tap = parse_request(helper_request(bridge="brvlan", vlan=10), config, fake_sysfs(tmp_path))
    assert tap == Tap(ifname=tap_name("g1", 0), bridge="brvlan", vlan=10, mac="52:54:00:00:00:01")
    name = tap.ifname
    assert bridge_commands(tap, bridge_mtu=9000, default_pvid=1) == [
        ["ip", "link", "set", "dev", name, "address", "fe:54:00:00:00:01", "mtu", "9000", "master", "brvlan"],
        ["bridge", "vlan", "add", "dev", name, "vid", "10", "pvid", "untagged"],
        ["bridge", "vlan", "del", "dev", name, "vid", "1"],
        ["ip", "link", "set", "dev", name, "up"],
    ]
    assert tap_mac("52:54:00:00:00:01") == "fe:54:00:00:00:01"
