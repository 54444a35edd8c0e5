"""The destination's side of a migration, over the agent's pipes: what it refuses before anything moves,
and an arrival that goes with the connection that made it (or with migration.dest_abort from another)."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_process import AgentProcess, StartAgent

from appliance.agent.accel import QEMU
from appliance.agent.arriving import machine_types, qemu_version

IMAGE = b"kernel bytes " * 1000
SHA256 = hashlib.sha256(IMAGE).hexdigest()
BRIDGED = {"user": False, "bridge": "br-none", "vlan": 0, "mac": "52:54:00:00:00:01", "model": "virtio"}


def departure(state: str = "stopped", **changes: Any) -> dict[str, Any]:
    """What a node says of a guest g leaving it (migration.source_begin's answer), with `changes` on top
    (`definition` changes go into the definition)."""
    definition = {"name": "g", "vcpus": 1, "memory_mib": 32, "disks": [], "nics": [],
                  "kernel_boot": {"kernel_image": "base", "initrd_image": "", "cmdline": ""}, "autostart": False,
                  "restart": "never", "cpu_weight": 100, "cpu_quota_percent": 0, "cloud_init": None, "cdrom": "",
                  "boot_order": [], "display": False, **changes.pop("definition", {})}  # fmt: skip
    said: dict[str, Any] = {"definition": definition, "state": state, "images": {"base": SHA256}, "disks": []}
    if state != "stopped":
        version = ".".join(map(str, qemu_version()))
        said.update(accel="tcg", cpu_model="any", machine=sorted(machine_types())[0], qemu_argv=[QEMU],
                    qemu_version=[int(part) for part in version.split(".")])  # fmt: skip
    return {**said, **changes}


@pytest.fixture
def destination(agent: AgentProcess) -> AgentProcess:
    assert "result" in agent.import_image("base", IMAGE)
    return agent


def refusal(agent: AgentProcess, said: dict[str, Any]) -> dict[str, Any]:
    reply = agent.call("migration.dest_check", {"departure": said})
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    return {"code": error["data"]["code"], "message": error["message"], "field": error["data"].get("field")}


def test_a_guest_the_destination_can_take_is_checked_and_the_images_it_lacks_named(destination: AgentProcess) -> None:
    assert destination.result("migration.dest_check", {"departure": departure()}) == {
        "name": "g",
        "missing_images": [],
    }
    lacking = departure(definition={"kernel_boot": {"kernel_image": "other", "initrd_image": "", "cmdline": ""}},
                        images={"other": "0" * 64})  # fmt: skip
    assert destination.result("migration.dest_check", {"departure": lacking})["missing_images"] == ["other"]


@pytest.mark.parametrize(
    ("said", "code", "words"),
    [
        (departure(images={"base": "f" * 64}), "migration_refused", "image 'base' here is not the one"),
        (departure("running", accel="kvm"), "migration_refused", "runs under KVM on its node"),
        (departure("running", machine="pc-q35-0.1"), "migration_refused", "which this node's QEMU does not have"),
        (departure("running", qemu_version=[99, 0, 0]), "migration_refused", "this node's QEMU is older"),
        (departure(definition={"memory_mib": 4 << 20}), "policy_memory", "more than guests may ever use"),
        (departure(definition={"nics": [BRIDGED]}), "invalid_params", "no bridge 'br-none'"),
        (departure(definition={"vcpus": "two"}), "invalid_params", "vcpus"),
    ],
    ids=["image-differs", "accelerator", "machine-type", "older-qemu", "policy", "bridge", "malformed"],
)
def test_the_destination_refuses_what_it_cannot_take_naming_it(
    destination: AgentProcess, said: dict[str, Any], code: str, words: str
) -> None:
    refused = refusal(destination, said)
    assert refused["code"] == code and words in refused["message"], refused


def test_a_name_or_mac_the_destination_has_already_is_refused(destination: AgentProcess) -> None:
    mac = "52:54:00:00:00:02"
    kernel = {"kernel_image": "base"}
    destination.result("guest.create", {"name": "g", "memory_mib": 32, "kernel_boot": kernel})
    destination.result("guest.create", {"name": "h", "memory_mib": 32, "kernel_boot": kernel,
                                        "nics": [{"user": True, "mac": mac}]})  # fmt: skip
    assert refusal(destination, departure())["code"] == "guest_exists"
    same_mac = departure(definition={"name": "i", "nics": [{"user": True, "bridge": "", "vlan": 0, "mac": mac,
                                                            "model": "virtio"}]})  # fmt: skip
    refused = refusal(destination, same_mac)
    assert refused["field"] == "nics[0].mac" and "used by guest 'h'" in refused["message"]


def arrival(state_dir: Path) -> Path:
    return state_dir / "guests" / "g"


def test_an_arrival_goes_with_the_connection_that_made_it(
    destination: AgentProcess, start_agent: StartAgent, state_dir: Path
) -> None:
    owner = start_agent()
    assert owner.result("migration.dest_begin", {"departure": departure()}) == {"name": "g", "files": []}
    (marker,) = arrival(state_dir).glob(".incoming-*")
    assert marker.name == f".incoming-{owner.process.pid}"
    # Another connection's agent (and its repair) leaves a live arrival alone, and does not list it.
    assert destination.result("guest.list") == []
    assert arrival(state_dir).is_dir()
    assert owner.close() == 0
    assert not arrival(state_dir).exists()


def test_an_arrival_abandoned_by_its_client_is_removed_from_another_connection(
    destination: AgentProcess, start_agent: StartAgent, state_dir: Path
) -> None:
    owner = start_agent()
    owner.result("migration.dest_begin", {"departure": departure()})
    # Its client is gone, but its agent has not heard yet: dest_abort ends that agent, then removes it.
    assert destination.result("migration.dest_abort", {"name": "g"}) == {"name": "g", "removed": True,
                                                                          "defined": False}  # fmt: skip
    assert owner.process.wait(timeout=30) == -signal.SIGTERM
    assert not arrival(state_dir).exists()
    assert destination.result("migration.dest_abort", {"name": "g"})["removed"] is False
    # The name is free: the guest can arrive again.
    again = start_agent()
    again.result("migration.dest_begin", {"departure": departure()})
    assert again.result("migration.dest_finish", {"name": "g"})["defined"] is True
    assert [guest["name"] for guest in destination.result("guest.list")] == ["g"]
    assert destination.result("migration.dest_abort", {"name": "g"}) == {"name": "g", "removed": False,
                                                                          "defined": True}  # fmt: skip


def test_migration_steps_asked_of_no_migration_are_refused(destination: AgentProcess) -> None:
    for method in ("migration.dest_listen", "migration.dest_finish", "migration.source_start"):
        assert destination.error_code(method, {"name": "g"}) == "not_migrating"
