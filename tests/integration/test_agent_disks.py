"""Disks of a defined guest through a real agent, real qemu-img and QEMU: added, grown, removed; refusals
that change nothing; and a running tiny guest that sees its disk grow and a new one arrive."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_process import AgentProcess
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER

DEADLINE = 120.0
GIB = 1 << 30
MARKER_DISK = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")
GUEST = {"name": "g1", "memory_mib": 32, "disks": [{"base_image": "marker"}, {"size_gib": 1}]}


def virtual_size(path: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, check=True)
    size: int = json.loads(info.stdout)["virtual-size"]
    return size


def refusal(agent: AgentProcess, method: str, params: dict[str, Any]) -> dict[str, Any]:
    reply = agent.call(method, params)
    assert "error" in reply, reply
    data: dict[str, Any] = {**reply["error"]["data"], "message": reply["error"]["message"]}
    return data


@pytest.fixture
def agent(agent: AgentProcess) -> AgentProcess:
    assert "result" in agent.import_image("marker", MARKER_DISK)
    agent.result("guest.create", GUEST)
    return agent


def test_a_stopped_guests_disks_are_added_grown_and_removed_to_kept_disks(agent: AgentProcess, state_dir: Path) -> None:
    guest_dir = state_dir / "guests" / "g1"
    added = agent.result("guest.disk_add", {"name": "g1", "size_gib": 2})
    assert added == {"name": "g1", "index": 2, "file": "disk2.qcow2", "size_gib": 2,
                     "attached": "at start", "restart_needed": False}  # fmt: skip
    assert virtual_size(guest_dir / "disk2.qcow2") == 2 * GIB

    grown = agent.result("guest.disk_grow", {"name": "g1", "index": 1, "size_gib": 3})
    assert grown == {"name": "g1", "index": 1, "size_gib": 3, "was_bytes": GIB, "live": False}
    assert virtual_size(guest_dir / "disk1.qcow2") == 3 * GIB
    # A disk over an image grows too; its definition keeps the image and the size it was grown to.
    agent.result("guest.disk_grow", {"name": "g1", "index": 0, "size_gib": 1})
    assert virtual_size(guest_dir / "disk0.qcow2") == GIB

    removed = agent.result("guest.disk_remove", {"name": "g1", "index": 1})
    assert removed["file"] == "disk1.qcow2" and not (guest_dir / "disk1.qcow2").exists()
    assert virtual_size(Path(removed["kept_in"]) / "disk1.qcow2") == 3 * GIB
    definition = agent.result("guest.info", {"name": "g1"})["definition"]
    assert definition["disks"] == [
        {"base_image": "marker", "size_gib": 1, "file": "disk0.qcow2"},
        {"base_image": "", "size_gib": 2, "file": "disk2.qcow2"},
    ]
    (kept,) = agent.result("kept.list")
    assert kept["disks"] == ["disk1.qcow2"] and kept["restorable"] is False

    # The next disk takes the free name; the guest starts with what its definition says.
    assert agent.result("guest.disk_add", {"name": "g1", "size_gib": 1})["file"] == "disk1.qcow2"
    agent.result("guest.start", {"name": "g1"})
    wait_until(lambda: PROBE_MARKER.decode() in agent.result("guest.console", {"name": "g1"})["text"], 60, "marker")
    pid = agent.result("guest.info", {"name": "g1"})["pid"]
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    for file in ("disk0.qcow2", "disk2.qcow2", "disk1.qcow2"):
        assert f"file={guest_dir / file},if=none,id={Path(file).stem}" in command_line


def test_refusals_name_the_field_and_change_nothing(agent: AgentProcess, state_dir: Path) -> None:
    before = agent.result("guest.info", {"name": "g1"})["definition"]
    smaller = refusal(agent, "guest.disk_grow", {"name": "g1", "index": 1, "size_gib": 1})
    assert smaller["code"] == "invalid_params" and smaller["field"] == "size_gib"
    assert "is 1 GiB already; a disk only grows" in smaller["message"]
    missing = refusal(agent, "guest.disk_remove", {"name": "g1", "index": 2})
    assert missing["field"] == "index" and "its disks: 0 to 1" in missing["message"]
    assert refusal(agent, "guest.disk_grow", {"name": "g1", "index": "0", "size_gib": 2})["field"] == "index"
    assert refusal(agent, "guest.disk_add", {"name": "g1", "size_gib": 0})["field"] == "size_gib"
    assert refusal(agent, "guest.disk_add", {"name": "nope", "size_gib": 1})["code"] == "guest_not_found"
    # Storage admission: the store times disk_overcommit (1.0 by default) holds no 60 TiB disk.
    assert refusal(agent, "guest.disk_add", {"name": "g1", "size_gib": 60 * 1024})["code"] == "policy_storage"
    assert refusal(agent, "guest.disk_grow", {"name": "g1", "index": 1, "size_gib": 60 * 1024})["code"] == (
        "policy_storage"
    )

    agent.result("guest.start", {"name": "g1"})
    running = refusal(agent, "guest.disk_remove", {"name": "g1", "index": 1})
    assert running["code"] == "guest_running" and "stop it to remove a disk" in running["message"]
    assert agent.result("guest.info", {"name": "g1"})["definition"] == before
    assert sorted(path.name for path in (state_dir / "guests" / "g1").glob("*.qcow2")) == [
        "disk0.qcow2",
        "disk1.qcow2",
    ]
    assert not (state_dir / "kept-disks").exists()
    agent.result("guest.kill", {"name": "g1"})

    # A removed disk over an image keeps the image in the store for as long as it is kept.
    removed = agent.result("guest.disk_remove", {"name": "g1", "index": 0})
    (kept,) = agent.result("kept.list")
    assert (kept["kept"], kept["guest"], kept["images"]) == (Path(removed["kept_in"]).name, "g1", ["marker"])
    assert agent.error_code("image.delete", {"name": "marker"}) == "image_in_use"
    agent.result("kept.purge", {"kept": kept["kept"]})
    assert agent.result("image.delete", {"name": "marker"})["deleted"]

    # A guest's last disk, when it boots from disks (or has nothing else), stays.
    agent.result("guest.create", {"name": "one", "memory_mib": 32, "disks": [{"size_gib": 1}]})
    assert refusal(agent, "guest.disk_remove", {"name": "one", "index": 0})["field"] == "index"


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


def disk_sectors(agent: AgentProcess, disk: str) -> int | None:
    """The last size the tiny guest printed for /sys/block/DISK, in 512-byte sectors."""
    sizes = [line.split()[2] for line in agent.result("guest.console", {"name": "tiny"})["text"].splitlines()
             if line.startswith(f"tiny-disk {disk} ")]  # fmt: skip
    return int(sizes[-1]) if sizes else None


@pytest.mark.slow
def test_a_running_guest_sees_its_disk_grow_and_a_new_disk_arrive(agent: AgentProcess, tiny_guest: TinyGuest) -> None:
    assert "result" in agent.import_image("tiny-vmlinuz", tiny_guest.kernel.read_bytes())
    assert "result" in agent.import_image("tiny-initrd", tiny_guest.initrd.read_bytes())
    boot = {"kernel_image": "tiny-vmlinuz", "initrd_image": "tiny-initrd", "cmdline": tiny_guest.cmdline}
    agent.result("guest.create", {"name": "tiny", "memory_mib": 256, "kernel_boot": boot, "disks": [{"size_gib": 1}]})
    agent.result("guest.start", {"name": "tiny"})
    wait_until(lambda: disk_sectors(agent, "vda") == GIB // 512, DEADLINE, "the guest to print vda's size")
    assert TINY_GUEST_MARKER in agent.result("guest.console", {"name": "tiny"})["text"]

    grown = agent.result("guest.disk_grow", {"name": "tiny", "index": 0, "size_gib": 2})
    assert grown["live"] is True and grown["was_bytes"] == GIB
    wait_until(lambda: disk_sectors(agent, "vda") == 2 * GIB // 512, DEADLINE, "the guest to see vda grown")
    smaller = refusal(agent, "guest.disk_grow", {"name": "tiny", "index": 0, "size_gib": 1})
    assert smaller["field"] == "size_gib" and "is 2 GiB already" in smaller["message"]

    added = agent.result("guest.disk_add", {"name": "tiny", "size_gib": 1})
    assert added["attached"] == "now", added
    wait_until(lambda: disk_sectors(agent, "vdb") == GIB // 512, DEADLINE, "the guest to see the new disk")
    # The hot-plugged disk grows like the others.
    assert agent.result("guest.disk_grow", {"name": "tiny", "index": 1, "size_gib": 3})["live"] is True
    wait_until(lambda: disk_sectors(agent, "vdb") == 3 * GIB // 512, DEADLINE, "the guest to see vdb grown")
    assert refusal(agent, "guest.disk_remove", {"name": "tiny", "index": 1})["code"] == "guest_running"
