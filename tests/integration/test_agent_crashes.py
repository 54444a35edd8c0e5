"""An agent killed (SIGKILL, as a power cut or kill -9) between any two steps of a change.

Each change's steps are named crash points (appliance/agent/crashpoints.py);
the agent kills itself on reaching the one it is told. The next agent must
leave a state in which the API can create, delete and re-import every name,
with nothing hidden on disk that blocks it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent
from helpers.waiting import wait_until

from appliance.agent.crashpoints import CRASH_AT

IMAGE = b"image bytes " * 1000
GUEST = {"name": "g", "vcpus": 1, "memory_mib": 32, "disks": [{"size_gib": 1}, {"base_image": "base"}]}


def crashing(start_agent: StartAgent, point: str) -> AgentProcess:
    return start_agent(env={CRASH_AT: point})


def assert_killed_by_its_crash_point(agent: AgentProcess) -> None:
    assert agent.process.stdout is not None
    assert agent.process.stdout.readline() == b"", "the agent answered instead of crashing"
    assert agent.process.wait(timeout=30) == -9


def send_import(agent: AgentProcess, name: str, data: bytes) -> None:
    params = {"name": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "image.import", "params": params}).encode()
    assert agent.process.stdin is not None
    agent.process.stdin.write(line + b"\n" + data)
    agent.process.stdin.flush()


def send(agent: AgentProcess, method: str, params: dict[str, object]) -> None:
    assert agent.process.stdin is not None
    agent.process.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode())
    agent.process.stdin.write(b"\n")
    agent.process.stdin.flush()


def hidden_entries(state_dir: Path) -> list[str]:
    """Work in progress of dead agents: dot-entries under guests/ and images/."""
    return [
        str(entry.relative_to(state_dir))
        for folder in ("guests", "images")
        if (state_dir / folder).is_dir()
        for entry in (state_dir / folder).iterdir()
        if entry.name.startswith(".")
    ]


def assert_every_name_usable(agent: AgentProcess, state_dir: Path) -> None:
    """Whatever the crash left: the API can delete, create and re-import the names again."""
    names = {guest["name"] for guest in agent.result("guest.list")}  # the first request repairs
    assert hidden_entries(state_dir) == []
    if "g" in names:
        agent.result("guest.delete", {"name": "g", "remove_disks": True})
    guests_dir = state_dir / "guests"
    assert not guests_dir.is_dir() or not list(guests_dir.iterdir()), "a guest directory without a guest"
    if "base" not in {image["name"] for image in agent.result("image.list")}:
        assert "result" in agent.import_image("base", IMAGE)
    assert agent.result("guest.create", GUEST)["name"] == "g"
    assert agent.result("guest.delete", {"name": "g", "remove_disks": True})["deleted"]
    # Kept disks over the image keep it in the store (image_in_use) until they are purged.
    for kept in agent.result("kept.list"):
        assert agent.result("kept.purge", {"kept": kept["kept"]})["purged"]
    assert agent.result("image.delete", {"name": "base"})["deleted"]
    assert "result" in agent.import_image("base", IMAGE)
    assert agent.result("guest.create", GUEST)["name"] == "g"
    assert sorted(entry.name for entry in (state_dir / "images").iterdir()) == ["base"]


@pytest.mark.parametrize("point", ["guest-create:disks", "guest-create:row"])
def test_a_create_killed_at_any_step(agent: AgentProcess, start_agent: StartAgent, state_dir: Path, point: str) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    victim = crashing(start_agent, point)
    send(victim, "guest.create", GUEST)
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    listed = [guest["name"] for guest in after.result("guest.list")]
    # Before the row: no guest. After it: the guest, whole, with its disks in place.
    assert listed == ([] if point == "guest-create:disks" else ["g"])
    if listed:
        assert (state_dir / "guests" / "g" / "disk0.qcow2").exists()
    assert_every_name_usable(after, state_dir)


@pytest.mark.parametrize("point", ["guest-delete:moved", "guest-delete:row"])
@pytest.mark.parametrize("remove_disks", [True, False], ids=["remove-disks", "keep-disks"])
def test_a_delete_killed_at_any_step(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path, point: str, remove_disks: bool
) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    agent.result("guest.create", GUEST)
    victim = crashing(start_agent, point)
    send(victim, "guest.delete", {"name": "g", "remove_disks": remove_disks})
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    if not remove_disks:
        # Kept disks are kept, whatever the crash: nothing the operator did not ask to lose is lost.
        assert list((state_dir / "kept-disks").glob("g-*/disk0.qcow2"))
    assert_every_name_usable(after, state_dir)


@pytest.mark.parametrize("point", ["image-import:row", "image-import:linked"])
def test_an_import_killed_at_any_step(start_agent: StartAgent, state_dir: Path, point: str) -> None:
    victim = crashing(start_agent, point)
    send_import(victim, "base", IMAGE)
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    listed = after.result("image.list")
    if listed:  # linked before the crash: the whole image, as it was sent
        assert (state_dir / "images" / "base").read_bytes() == IMAGE
    assert_every_name_usable(after, state_dir)


def test_a_delete_of_an_image_killed_between_file_and_row(start_agent: StartAgent, state_dir: Path) -> None:
    assert "result" in start_agent().import_image("base", IMAGE)
    victim = crashing(start_agent, "image-delete:unlinked")
    send(victim, "image.delete", {"name": "base"})
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    assert after.result("image.list") == []
    assert_every_name_usable(after, state_dir)


def test_a_partial_upload_of_a_killed_agent_is_removed_by_the_next_agent_at_once(
    start_agent: StartAgent, state_dir: Path
) -> None:
    victim = start_agent()
    params = {"name": "big", "size_bytes": 10 * len(IMAGE), "sha256": "0" * 64}
    assert victim.process.stdin is not None
    request = {"jsonrpc": "2.0", "id": 1, "method": "image.import", "params": params}
    victim.process.stdin.write(json.dumps(request).encode() + b"\n" + IMAGE)
    victim.process.stdin.flush()
    images = state_dir / "images"
    wait_until(lambda: images.is_dir() and hidden_entries(state_dir), 30, "the upload's partial file")
    victim.kill()
    start_agent().result("image.list")  # a connection that imports nothing
    assert hidden_entries(state_dir) == []


def test_a_restore_of_kept_disks_killed_after_its_row_brings_the_guest_back(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path
) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    agent.result("guest.create", GUEST)
    agent.result("guest.delete", {"name": "g"})
    (kept,) = agent.result("kept.list")
    victim = crashing(start_agent, "kept-restore:row")
    send(victim, "kept.restore", {"kept": kept["kept"]})
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    assert [guest["name"] for guest in after.result("guest.list")] == ["g"]
    assert (state_dir / "guests" / "g" / "disk0.qcow2").exists() and after.result("kept.list") == []
    assert_every_name_usable(after, state_dir)


def guest_files(state_dir: Path) -> list[str]:
    """What guest g's directory holds (work in progress of dead agents included)."""
    return sorted(entry.name for entry in (state_dir / "guests" / "g").iterdir())


def disk_files(agent: AgentProcess) -> list[str]:
    """The files guest g's definition names (the first request also repairs)."""
    return [disk["file"] for disk in agent.result("guest.info", {"name": "g"})["definition"]["disks"]]


def virtual_size(path: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True)
    size: int = json.loads(info.stdout)["virtual-size"]
    return size


@pytest.mark.parametrize("point", ["disk-add:file", "disk-add:row"])
def test_a_disk_add_killed_at_any_step(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path, point: str
) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    agent.result("guest.create", GUEST)
    victim = crashing(start_agent, point)
    send(victim, "guest.disk_add", {"name": "g", "size_gib": 2})
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    # Before the row: no new disk, and its file gone. After it: the disk, its file in place.
    added = [] if point == "disk-add:file" else ["disk2.qcow2"]
    assert disk_files(after) == ["disk0.qcow2", "disk1.qcow2", *added]
    assert guest_files(state_dir) == ["disk0.qcow2", "disk1.qcow2", *added]
    if added:
        assert virtual_size(state_dir / "guests" / "g" / "disk2.qcow2") == 2 << 30
    else:  # the file name is free again
        assert after.result("guest.disk_add", {"name": "g", "size_gib": 1})["file"] == "disk2.qcow2"
    assert_every_name_usable(after, state_dir)


@pytest.mark.parametrize("point", ["disk-grow:marked", "disk-grow:row"])
def test_a_disk_grow_killed_at_any_step(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path, point: str
) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    agent.result("guest.create", GUEST)
    victim = crashing(start_agent, point)
    send(victim, "guest.disk_grow", {"name": "g", "index": 0, "size_gib": 2})
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    # Before the row: as it was. After it: what the definition says, the file grown by the next agent.
    size_gib = 1 if point == "disk-grow:marked" else 2
    assert after.result("guest.info", {"name": "g"})["definition"]["disks"][0]["size_gib"] == size_gib
    assert virtual_size(state_dir / "guests" / "g" / "disk0.qcow2") == size_gib << 30
    assert guest_files(state_dir) == ["disk0.qcow2", "disk1.qcow2"]
    assert after.result("guest.disk_grow", {"name": "g", "index": 0, "size_gib": 3})["size_gib"] == 3
    assert_every_name_usable(after, state_dir)


@pytest.mark.parametrize("point", ["disk-remove:moved", "disk-remove:row"])
def test_a_disk_remove_killed_at_any_step(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path, point: str
) -> None:
    assert "result" in agent.import_image("base", IMAGE)
    agent.result("guest.create", GUEST)
    victim = crashing(start_agent, point)
    send(victim, "guest.disk_remove", {"name": "g", "index": 1})  # the disk over the image
    assert_killed_by_its_crash_point(victim)
    after = start_agent()
    if point == "disk-remove:moved":  # before the row: the disk is back where it was
        assert disk_files(after) == ["disk0.qcow2", "disk1.qcow2"]
        assert guest_files(state_dir) == ["disk0.qcow2", "disk1.qcow2"]
        assert not (state_dir / "kept-disks").exists()
    else:  # after it: removed, and its file kept, whatever the crash, with the image it is over
        assert disk_files(after) == ["disk0.qcow2"]
        assert guest_files(state_dir) == ["disk0.qcow2"]
        (kept,) = after.result("kept.list")
        assert kept["disks"] == ["disk1.qcow2"] and kept["kept"].startswith("g-disk1-")
        assert kept["images"] == ["base"] and after.error_code("image.delete", {"name": "base"}) == "image_in_use"
    assert_every_name_usable(after, state_dir)
