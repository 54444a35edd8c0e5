"""Host policy refusals and the balloon, through a real agent and QEMU (TCG)."""

from __future__ import annotations

from helpers.agent_process import AgentProcess, StartAgent

from appliance.agent.accel import PROBE_BOOT_SECTOR
from appliance.agent.host import read_meminfo

MIB = 1024 * 1024
TOTAL_MIB = read_meminfo()["MemTotal"] // MIB


def agent_with_policy(start_agent: StartAgent, policy: str) -> AgentProcess:
    agent = start_agent(policy)
    assert "result" in agent.import_image("disk", PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    return agent


def guest(name: str, memory_mib: int = 32, vcpus: int = 1) -> dict[str, object]:
    return {"name": name, "memory_mib": memory_mib, "vcpus": vcpus, "disks": [{"base_image": "disk"}]}


def test_max_guests_is_enforced_at_create(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "max_guests = 2")
    agent.result("guest.create", guest("a"))
    agent.result("guest.create", guest("b"))
    reply = agent.call("guest.create", guest("c"))
    assert reply["error"]["data"]["code"] == "policy_max_guests"
    assert "max_guests 2" in reply["error"]["message"]


def test_a_guest_larger_than_the_host_allows_is_refused_with_the_figures(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "reserved_memory_mib = 512\nmemory_overcommit = 1.0")
    reply = agent.call("guest.create", guest("huge", memory_mib=TOTAL_MIB))
    assert reply["error"]["data"]["code"] == "policy_memory"
    message = reply["error"]["message"]
    assert f"{TOTAL_MIB} MiB total" in message and "512 MiB reserved" in message
    assert agent.result("guest.list") == []


def test_start_is_refused_when_running_guests_use_the_memory(start_agent: StartAgent) -> None:
    # Leave room for exactly one 64 MiB guest.
    agent = agent_with_policy(start_agent, f"reserved_memory_mib = {TOTAL_MIB - 100}")
    agent.result("guest.create", guest("first", memory_mib=64))
    agent.result("guest.create", guest("second", memory_mib=64))
    agent.result("guest.start", {"name": "first"})
    reply = agent.call("guest.start", {"name": "second"})
    assert reply["error"]["data"]["code"] == "policy_memory"
    assert "64 MiB" in reply["error"]["message"] and "100 MiB" in reply["error"]["message"]
    assert agent.result("guest.info", {"name": "second"})["state"] == "stopped"


def test_start_is_refused_past_the_vcpu_overcommit(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "cpu_overcommit = 0.5")
    agent.result("guest.create", guest("wide", vcpus=8))
    reply = agent.call("guest.start", {"name": "wide"})
    assert reply["error"]["data"]["code"] == "policy_cpu"
    assert "8 vCPUs" in reply["error"]["message"]


def test_balloon_target_is_set_through_qmp(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "")
    agent.result("guest.create", guest("b", memory_mib=128))
    agent.result("guest.start", {"name": "b"})
    # The boot-sector guest has no balloon driver, so the target is set but not reached:
    # QMP reports the request accepted and the actual size unchanged.
    result = agent.result("guest.set_memory", {"name": "b", "memory_mib": 64})
    assert result["target_mib"] == 64 and result["actual_mib"] == 128
    assert agent.error_code("guest.set_memory", {"name": "b", "memory_mib": 256}) == "invalid_params"


def test_host_report_counts_guests_and_what_they_hold(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "reserved_memory_mib = 256")
    agent.result("guest.create", guest("up", memory_mib=48))
    agent.result("guest.create", guest("down", memory_mib=32))
    agent.result("guest.start", {"name": "up"})
    report = agent.result("host.report")
    assert report["guests_by_state"] == {"running": 1, "stopped": 1}
    assert report["memory_allocated_to_guests_bytes"] == 48 * MIB
    assert report["memory_reserved_for_host_bytes"] == 256 * MIB
    assert report["accelerator"] == "tcg"  # the test agent runs guests with APPLIANCE_ACCEL=tcg
    assert 0 < report["storage_free_bytes"] <= report["storage_total_bytes"]
    assert len(report["load"]) == 3


def test_disks_larger_than_the_store_allows_are_refused_with_the_figures(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "disk_overcommit = 1.0")
    huge = {"name": "huge", "memory_mib": 32, "disks": [{"size_gib": 49 * 1024}]}
    reply = agent.call("guest.create", huge)
    assert reply["error"]["data"]["code"] == "policy_storage"
    assert "50176.0 GiB" in reply["error"]["message"] and "disk_overcommit" in reply["error"]["message"]
    assert agent.result("guest.list") == []
    # Thin provisioning, when the policy allows it.
    thin = start_agent("disk_overcommit = 100")
    assert thin.result("guest.create", {**huge, "disks": [{"size_gib": 64}]})["name"] == "huge"


def test_a_guest_with_nothing_to_boot_is_refused(start_agent: StartAgent) -> None:
    agent = agent_with_policy(start_agent, "")
    reply = agent.call("guest.create", {"name": "empty", "memory_mib": 32})
    assert reply["error"]["data"]["code"] == "invalid_params" and "nothing to boot" in reply["error"]["message"]


def test_the_report_gives_one_answer_about_kvm(start_agent: StartAgent) -> None:
    report = agent_with_policy(start_agent, "").result("host.report")
    assert report["kvm"]["usable"] == (report["accelerator"] == "kvm")
    assert report["accelerator"] == "tcg" and report["kvm"]["detail"] == report["accelerator_reason"]
