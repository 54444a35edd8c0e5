"""What an operator does to a guest after creating it: reboots both ways, a new definition,
its kept disks brought back or purged; and the node verbs, which need systemd."""

from __future__ import annotations

import pytest
from helpers.agent_process import AgentProcess

from appliance.agent.accel import PROBE_BOOT_SECTOR

GUEST = {"name": "g1", "vcpus": 1, "memory_mib": 32, "disks": [{"base_image": "marker"}, {"size_gib": 1}]}


@pytest.fixture
def agent(agent: AgentProcess) -> AgentProcess:
    """The shared agent, with a boot-sector guest defined (it ignores ACPI)."""
    assert "result" in agent.import_image("marker", PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    agent.result("guest.create", GUEST)
    return agent


def test_reboot_is_a_reset_or_an_acpi_cycle_and_says_which(agent: AgentProcess) -> None:
    pid = agent.result("guest.start", {"name": "g1"})["pid"]
    reset = agent.result("guest.reboot", {"name": "g1", "mode": "reset"})
    assert reset == {"name": "g1", "mode": "reset", "forced": True, "pid": pid}
    cycled = agent.result("guest.reboot", {"name": "g1", "mode": "acpi", "timeout": 1})
    # The boot sector ignores the power button: forced after the timeout, then started again.
    assert cycled["mode"] == "acpi" and cycled["forced"] is True and cycled["pid"] not in (None, pid)
    assert agent.result("guest.info", {"name": "g1"})["state"] == "running"
    assert agent.error_code("guest.reboot", {"name": "g1", "mode": "warm"}) == "invalid_params"


def test_update_keeps_a_new_definition_and_says_what_needs_a_restart(agent: AgentProcess) -> None:
    result = agent.result("guest.update", {"name": "g1", "memory_mib": 64, "autostart": True})
    assert result["changed"] == ["autostart", "memory_mib"] and result["restart_needed"] is False
    definition = agent.result("guest.info", {"name": "g1"})["definition"]
    assert (definition["memory_mib"], definition["autostart"]) == (64, True)
    agent.result("guest.start", {"name": "g1"})
    running = agent.result("guest.update", {"name": "g1", "vcpus": 2})
    assert running["restart_needed"] is True
    assert agent.error_code("guest.update", {"name": "g1", "disks": []}) == "invalid_params"
    assert agent.error_code("guest.update", {"name": "g1", "memory_mib": 0}) == "invalid_params"
    assert agent.error_code("guest.update", {"name": "ghost", "vcpus": 2}) == "guest_not_found"
    assert agent.result("guest.info", {"name": "g1"})["definition"]["vcpus"] == 2


def test_kept_disks_are_listed_restored_with_their_definition_and_purged(agent: AgentProcess) -> None:
    agent.result("guest.update", {"name": "g1", "autostart": True})
    agent.result("guest.delete", {"name": "g1"})
    (kept,) = agent.result("kept.list")
    assert kept["guest"] == "g1" and kept["restorable"] and kept["disks"] == ["disk0.qcow2", "disk1.qcow2"]
    agent.result("guest.create", GUEST)  # the name is free again
    assert agent.error_code("kept.restore", {"kept": kept["kept"]}) == "guest_exists"
    restored = agent.result("kept.restore", {"kept": kept["kept"], "name": "g1-back"})
    assert restored["name"] == "g1-back" and restored["autostart"] is True
    assert agent.result("kept.list") == []
    agent.result("guest.start", {"name": "g1-back"})  # its disks are where they should be
    for bad in ("../g1", kept["kept"], "", 5):
        assert agent.error_code("kept.purge", {"kept": bad}) == "kept_not_found"
    agent.result("guest.delete", {"name": "g1", "remove_disks": True})
    agent.result("guest.delete", {"name": "g1-back", "force": True})
    (again,) = agent.result("kept.list")
    assert agent.result("kept.purge", {"kept": again["kept"]}) == {"kept": again["kept"], "purged": True}
    assert agent.result("kept.list") == []


def test_node_verbs_need_systemd_and_say_so(agent: AgentProcess) -> None:
    # This machine's PID 1 is not systemd; the booted appliance's is (tests/system/test_image.py).
    for method in ("node.reboot", "node.shutdown", "node.logs"):
        assert agent.error_code(method) == "unsupported", method
    assert agent.error_code("node.logs", {"unit": "a b"}) == "invalid_params"
    assert agent.error_code("node.logs", {"lines": 0}) == "invalid_params"


def test_update_changes_nics_and_the_seed_and_keeps_macs_unique(agent: AgentProcess) -> None:
    updated = agent.result("guest.update", {"name": "g1", "nics": [{"user": True}], "cloud_init": {"hostname": "a"}})
    assert updated["changed"] == ["cloud_init", "nics"]
    (nic,) = updated["definition"]["nics"]
    assert nic["user"] and nic["mac"]  # derived, and kept from now on
    again = agent.result("guest.update", {"name": "g1", "cloud_init": {"hostname": "b"}})
    assert again["definition"]["nics"][0]["mac"] == nic["mac"] and again["changed"] == ["cloud_init"]
    agent.result("guest.create", {**GUEST, "name": "g2", "disks": [{"size_gib": 1}]})
    reply = agent.call("guest.update", {"name": "g2", "nics": [{"user": True, "mac": nic["mac"]}]})
    assert reply["error"]["data"]["field"] == "nics[0].mac" and "'g1'" in reply["error"]["message"]


def test_an_image_under_kept_disks_is_not_deleted_from_under_them(agent: AgentProcess) -> None:
    agent.result("guest.delete", {"name": "g1"})
    reply = agent.call("image.delete", {"name": "marker"})
    assert reply["error"]["data"]["code"] == "image_in_use" and "kept.purge" in reply["error"]["message"]
    (kept,) = agent.result("kept.list")
    assert kept["images"] == ["marker"]
    agent.result("kept.purge", {"kept": kept["kept"]})
    assert agent.result("image.delete", {"name": "marker"})["deleted"]


def test_a_network_config_given_as_an_object_survives_an_update(agent: AgentProcess) -> None:
    network = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    agent.result("guest.update", {"name": "g1", "cloud_init": {"hostname": "a", "network_config": network}})
    assert agent.result("guest.update", {"name": "g1", "memory_mib": 48})["changed"] == ["memory_mib"]
