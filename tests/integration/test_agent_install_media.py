"""Install media through a real agent: image kinds read on import (an ISO made by xorriso, disk images),
an older store's rows given theirs, a CD-ROM that must be an ISO, and a guest booting from its CD-ROM
in the order its definition gives."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, boot_sector_printing

MARKER_DISK = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")
CD_MARKER = b"BOOTED-FROM-CD"


def make_iso(directory: Path, bootable: bool = False) -> bytes:
    """An ISO 9660 image by xorriso; bootable: El Torito, no emulation, a boot sector printing CD_MARKER."""
    tree = directory / "iso-tree"
    tree.mkdir(parents=True)
    (tree / "README").write_text("install me\n")
    boot = ["-b", "boot.img", "-no-emul-boot", "-boot-load-size", "4"] if bootable else []
    if bootable:
        (tree / "boot.img").write_bytes(boot_sector_printing(CD_MARKER + b"\r\n").ljust(2048, b"\0"))
    iso = directory / "test.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "TESTCD", "-o", str(iso), *boot, str(tree)],
                   check=True, capture_output=True)  # fmt: skip
    return iso.read_bytes()


def make_qcow2(directory: Path) -> bytes:
    path = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path.read_bytes()


def kinds(agent: AgentProcess) -> dict[str, str]:
    return {image["name"]: image["kind"] for image in agent.result("image.list")}


def test_images_get_their_kind_from_their_content(agent: AgentProcess, tmp_path: Path) -> None:
    assert "result" in agent.import_image("installer", make_iso(tmp_path))
    assert "result" in agent.import_image("raw-disk", MARKER_DISK)
    assert "result" in agent.import_image("cloud", make_qcow2(tmp_path))
    assert "result" in agent.import_image("notes", b"not an image\n")
    assert kinds(agent) == {"installer": "iso", "raw-disk": "disk", "cloud": "disk", "notes": "unknown"}


def test_an_older_stores_images_get_their_kind_when_listed(
    start_agent: StartAgent, state_dir: Path, tmp_path: Path
) -> None:
    # The store as agents before kinds left it: no kind column.
    (state_dir / "images").mkdir(parents=True)
    (state_dir / "images" / "old.iso").write_bytes(make_iso(tmp_path))
    (state_dir / "images" / "old-disk").write_bytes(MARKER_DISK)
    with sqlite3.connect(state_dir / "agent.db") as db:
        db.executescript(
            "CREATE TABLE guests (name TEXT PRIMARY KEY, definition TEXT NOT NULL, created REAL NOT NULL);"
            "CREATE TABLE images (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,"
            " created REAL NOT NULL);"
            "INSERT INTO images VALUES ('old.iso', 1, 'x', 0), ('old-disk', 1, 'x', 0);"
        )
    agent = start_agent()
    assert kinds(agent) == {"old.iso": "iso", "old-disk": "disk"}
    with sqlite3.connect(state_dir / "agent.db") as db:
        assert dict(db.execute("SELECT name, kind FROM images").fetchall()) == {"old.iso": "iso", "old-disk": "disk"}
    # The old rows serve as before.
    agent.result("guest.create", {"name": "g", "memory_mib": 32, "cdrom": "old.iso"})


def test_a_cdrom_must_be_an_iso_and_refusals_change_nothing(agent: AgentProcess, tmp_path: Path) -> None:
    assert "result" in agent.import_image("raw-disk", MARKER_DISK)
    assert "result" in agent.import_image("installer", make_iso(tmp_path))
    reply = agent.call("guest.create", {"name": "g", "memory_mib": 32, "cdrom": "raw-disk"})
    assert reply["error"]["data"] == {"code": "invalid_params", "field": "cdrom"}
    assert reply["error"]["message"] == "cdrom: image 'raw-disk' is a disk image, not an ISO (a CD-ROM needs kind iso)"
    missing = agent.call("guest.create", {"name": "g", "memory_mib": 32, "cdrom": "nothing.iso"})
    assert missing["error"]["data"]["field"] == "cdrom" and "no image named" in missing["error"]["message"]
    assert agent.result("guest.list") == []

    agent.result("guest.create", {"name": "g", "memory_mib": 32, "disks": [{"size_gib": 1}]})
    swapped = agent.call("guest.update", {"name": "g", "cdrom": "raw-disk", "boot_order": ["cdrom"]})
    assert swapped["error"]["data"]["field"] == "cdrom"
    lacking = agent.call("guest.update", {"name": "g", "boot_order": ["disk", "cdrom"]})
    assert lacking["error"]["data"] == {"code": "invalid_params", "field": "boot_order[1]"}
    assert "the guest has no cdrom to boot from" in lacking["error"]["message"]
    definition = agent.result("guest.info", {"name": "g"})["definition"]
    assert (definition["cdrom"], definition["boot_order"]) == ("", [])
    changed = agent.result("guest.update", {"name": "g", "cdrom": "installer", "boot_order": ["cdrom", "disk"]})
    assert changed["changed"] == ["boot_order", "cdrom"]
    assert agent.error_code("image.delete", {"name": "installer"}) == "image_in_use"


def test_a_guest_boots_its_cdrom_in_the_order_it_gives(agent: AgentProcess, tmp_path: Path) -> None:
    assert "result" in agent.import_image("boot-cd", make_iso(tmp_path, bootable=True))
    assert "result" in agent.import_image("marker", MARKER_DISK)
    # Its disk boots too: only the boot order puts the CD first.
    agent.result("guest.create", {"name": "g", "memory_mib": 32, "disks": [{"base_image": "marker"}],
                                  "cdrom": "boot-cd", "boot_order": ["cdrom", "disk"]})  # fmt: skip
    pid = agent.result("guest.start", {"name": "g"})["pid"]
    wait_until(
        lambda: CD_MARKER.decode() in agent.result("guest.console", {"name": "g"})["text"], 60, "the CD's marker"
    )
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"ide-cd,drive=cdrom0,bus=ide.0,bootindex=1" in command_line
    assert b"virtio-blk-pci,drive=disk0,bootindex=2" in command_line
    agent.result("guest.kill", {"name": "g"})

    agent.result("guest.update", {"name": "g", "boot_order": ["disk", "cdrom"]})
    agent.result("guest.start", {"name": "g"})
    wait_until(lambda: "KVMOK" in agent.result("guest.console", {"name": "g"})["text"], 60, "the disk's marker")
    assert CD_MARKER.decode() not in agent.result("guest.console", {"name": "g"})["text"]


@pytest.mark.parametrize("order", [["network"], ["kernel"]])
def test_a_boot_order_naming_what_the_guest_lacks_is_refused(agent: AgentProcess, order: list[str]) -> None:
    reply = agent.call("guest.create", {"name": "g", "memory_mib": 32, "disks": [{"size_gib": 1}], "boot_order": order})
    assert reply["error"]["data"] == {"code": "invalid_params", "field": "boot_order[0]"}
    assert f"no {order[0]} to boot from (it has: disk)" in reply["error"]["message"]


def chunks(total: int, first: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """`first`, then zeros, `total` bytes in all, a MiB at a time (never the whole image in memory)."""
    yield first
    left = total - len(first)
    zeros = bytes(size)
    while left > 0:
        yield zeros[: min(size, left)]
        left -= min(size, left)


@pytest.mark.slow
def test_a_multi_gigabyte_disk_image_streams_in_and_gets_its_kind(agent: AgentProcess, state_dir: Path) -> None:
    total = (2 << 30) + 12345
    digest = hashlib.sha256()
    for chunk in chunks(total, PROBE_BOOT_SECTOR):
        digest.update(chunk)
    params = {"name": "big.raw", "size_bytes": total, "sha256": digest.hexdigest()}
    stdin, stdout = agent.process.stdin, agent.process.stdout
    assert stdin is not None and stdout is not None
    stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "image.import", "params": params}).encode() + b"\n")
    for chunk in chunks(total, PROBE_BOOT_SECTOR):
        stdin.write(chunk)
    stdin.flush()
    assert json.loads(stdout.readline())["result"]["size_bytes"] == total
    assert kinds(agent) == {"big.raw": "disk"}
    assert (state_dir / "images" / "big.raw").stat().st_size == total
    # Streamed: the agent's peak memory is a few chunks, nowhere near the image's size.
    status = Path(f"/proc/{agent.process.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak_kib < 100 * 1024, status
