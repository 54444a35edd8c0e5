"""Install media and boot order: image kinds by content, CD-ROM and boot order definitions, QEMU's arguments."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.accel import PROBE_BOOT_SECTOR, AccelChoice
from appliance.agent.errors import AgentError
from appliance.agent.guests import Hypervisor, qemu_argv
from appliance.agent.media import ImageKind, kind_of
from appliance.agent.model import BootDevice, Disk, guest_spec_from_json, parse_guest_spec, updated_spec

BASE: dict[str, Any] = {"name": "g1", "vcpus": 1, "memory_mib": 64}


def at(offset: int, magic: bytes, size: int = 0x9000) -> bytes:
    return (b"\0" * offset + magic).ljust(size, b"\0")


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"QFI\xfb\x00\x00\x00\x03".ljust(0x9000, b"\0"), ImageKind.DISK),
        (PROBE_BOOT_SECTOR.ljust(0x9000, b"\0"), ImageKind.DISK),  # raw, a boot sector
        (at(512, b"EFI PART"), ImageKind.DISK),  # raw, a GPT
        (at(0x8001, b"CD001"), ImageKind.ISO),
        # A hybrid ISO carries a boot sector too, and a bzImage the 0x55AA of its setup sector.
        (PROBE_BOOT_SECTOR + at(0x8001 - 512, b"CD001"), ImageKind.ISO),
        (PROBE_BOOT_SECTOR + at(0x202 - 512, b"HdrS"), ImageKind.KERNEL),
        (gzip.compress(b"070701" + b"0" * 100), ImageKind.INITRD),
        (b"070701" + b"0" * 100, ImageKind.INITRD),
        (b"\x28\xb5\x2f\xfd" + b"\0" * 100, ImageKind.INITRD),
        (b"image bytes " * 1000, ImageKind.UNKNOWN),
        (b"", ImageKind.UNKNOWN),
    ],
    ids=["qcow2", "raw-mbr", "raw-gpt", "iso", "hybrid-iso", "bzimage", "gzip", "cpio", "zstd", "text", "empty"],
)
def test_an_images_kind_comes_from_its_content(head: bytes, kind: ImageKind) -> None:
    assert kind_of(head[:0x8006]) is kind


def refused(params: dict[str, Any]) -> AgentError:
    with pytest.raises(AgentError) as caught:
        parse_guest_spec({**BASE, **params})
    assert caught.value.code == "invalid_params"
    return caught.value


def test_a_boot_order_names_only_devices_the_guest_has_each_once_and_a_kernel_first() -> None:
    spec = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}], "cdrom": "debian.iso",
                             "boot_order": ["cdrom", "disk"]})  # fmt: skip
    assert spec.boot_order == (BootDevice.CDROM, BootDevice.DISK)
    lacking = refused({"disks": [{"size_gib": 1}], "boot_order": ["disk", "cdrom"]})
    assert lacking.details["field"] == "boot_order[1]"
    assert "no cdrom to boot from (it has: disk)" in lacking.message
    assert refused({"disks": [{"size_gib": 1}], "boot_order": ["network"]}).details["field"] == "boot_order[0]"
    unknown = refused({"disks": [{"size_gib": 1}], "boot_order": ["floppy"]})
    assert "allowed: disk, cdrom, network, kernel" in unknown.message
    twice = refused({"disks": [{"size_gib": 1}], "boot_order": ["disk", "disk"]})
    assert twice.details["field"] == "boot_order[1]" and "twice" in twice.message
    kernel = {"kernel_image": "vmlinuz"}
    late = refused({"disks": [{"size_gib": 1}], "kernel_boot": kernel, "boot_order": ["disk", "kernel"]})
    assert "put kernel first" in late.message
    assert refused({"disks": [{"size_gib": 1}], "boot_order": "disk"}).details["field"] == "boot_order"
    assert refused({"disks": [{"size_gib": 1}], "display": "yes"}).details["field"] == "display"


def test_a_cdrom_alone_is_something_to_boot() -> None:
    assert parse_guest_spec({**BASE, "cdrom": "installer.iso"}).cdrom == "installer.iso"
    for bad in ("../escape", {}, 0):
        assert refused({"cdrom": bad}).details["field"] == "cdrom"
    assert parse_guest_spec({**BASE, "disks": [{"size_gib": 1}], "cdrom": None}).cdrom == ""


def test_disks_are_named_by_file_and_keep_their_files_through_an_update() -> None:
    spec = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}, {"base_image": "base"}]})
    assert [disk.file for disk in spec.disks] == ["disk0.qcow2", "disk1.qcow2"]
    # As disks.py leaves it after a remove and a grow: files no longer follow the order.
    moved = replace(spec, disks=(Disk(base_image="base", size_gib=20, file="disk1.qcow2"),))
    updated = updated_spec(moved, {"memory_mib": 128, "display": True})
    assert updated.disks == moved.disks and updated.display and updated.memory_mib == 128
    assert guest_spec_from_json(updated.to_json()) == updated


def test_definitions_stored_before_media_and_disk_files_read_as_before() -> None:
    stored = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}, {"size_gib": 2}]}).to_json()
    for key in ("cdrom", "boot_order", "display"):
        del stored[key]
    for disk in stored["disks"]:
        del disk["file"]
    spec = guest_spec_from_json(stored)
    assert [disk.file for disk in spec.disks] == ["disk0.qcow2", "disk1.qcow2"]
    assert (spec.cdrom, spec.boot_order, spec.display) == ("", (), False)


def hypervisor(tmp_path: Path) -> Hypervisor:
    host = Hypervisor(tmp_path / "state", AccelChoice("tcg", "tests"))
    host.images_dir.mkdir(parents=True)
    for name in ("debian.iso", "vmlinuz"):
        (host.images_dir / name).write_bytes(b"")
    return host


def test_qemu_gets_the_boot_order_as_boot_indexes_the_cdrom_read_only_and_a_display_on_a_socket(
    tmp_path: Path,
) -> None:
    host = hypervisor(tmp_path)
    spec = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}, {"size_gib": 1}], "cdrom": "debian.iso",
                             "nics": [{"user": True}], "boot_order": ["cdrom", "disk", "network"],
                             "display": True})  # fmt: skip
    paths = host.paths("g1")
    joined = " ".join(qemu_argv(host, spec, paths))
    assert f"file={paths.directory}/disk0.qcow2,if=none,id=disk0,format=qcow2" in joined
    assert "virtio-blk-pci,drive=disk0,bootindex=2" in joined and "virtio-blk-pci,drive=disk1,bootindex=3" in joined
    iso = host.images_dir / "debian.iso"
    assert f"file={iso},if=none,id=cdrom0,media=cdrom,readonly=on,format=raw" in joined
    assert "ide-cd,drive=cdrom0,bus=ide.0,bootindex=1" in joined
    # Network boot keeps the NIC's option ROM (iPXE), which NICs otherwise go without.
    assert "netdev=net0,bootindex=4" in joined and "romfile=" not in joined
    assert "-boot strict=on" in joined
    assert f"-device VGA -vnc unix:{paths.vnc_socket}" in joined
    assert f"socket,id=serial0,path={paths.serial_socket},server=on,wait=off,logfile={paths.console_log}" in joined
    assert "-serial chardev:serial0" in joined


def test_without_a_boot_order_the_firmware_keeps_its_own_and_there_is_no_display(tmp_path: Path) -> None:
    host = hypervisor(tmp_path)
    spec = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}], "cdrom": "debian.iso", "nics": [{"user": True}],
                             "kernel_boot": {"kernel_image": "vmlinuz"}})  # fmt: skip
    joined = " ".join(qemu_argv(host, spec, host.paths("g1")))
    assert "bootindex" not in joined and "-boot" not in joined and "-vnc" not in joined
    assert "romfile=" in joined
    kernel_first = parse_guest_spec({**BASE, "disks": [{"size_gib": 1}], "kernel_boot": {"kernel_image": "vmlinuz"},
                                     "boot_order": ["kernel", "disk"]})  # fmt: skip
    # The kernel's option ROM holds boot index 0; the devices come after it.
    assert "drive=disk0,bootindex=1" in " ".join(qemu_argv(host, kernel_first, host.paths("g1")))
