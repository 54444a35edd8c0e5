"""The disk's layout, as the packer writes NAME.raw and the node writes a disk it installs itself on.

  1  bios            GRUB's i386-pc core.img (BIOS boot; boot.img sits in sector 0)
  2  esp             vfat: EFI/BOOT/BOOTX64.EFI, grub/grub.cfg, grub/grubenv
  3  appliance-a     ext4 root slot A: live/filesystem.squashfs, live/vmlinuz, live/initrd.img, live/boot.cfg
  4  appliance-b     ext4 root slot B, same size: an upgrade writes it and arms a trial boot of it
  5  appliance-data  ext4; the disk image's is small and the node grows it to the end of its disk

Standard library only: the packer (appliance.build.pack.disk) imports it on the
build host, the agent's install and upgrade code on the node, so both write
the same partitions with the same UUIDs, sizes and boot sector.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

SECTOR = 512
MiB = 1 << 20

BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# A type of our own: the node's systemd-repart matches partitions by type, and
# with the slots' generic Linux type it would take slot A for the data partition.
# elements/appliance-data/static/usr/lib/appliance/repart.d/50-data.conf names it too.
DATA_TYPE = "A2D5BDB4-D4D3-5922-90FE-93CCD2F7B268"
# Partition UUIDs are uuid5(this, "BUILD_ID/NAME").
PARTITION_UUID_NAMESPACE = uuid.UUID("5d0c4f4e-7a0b-4c49-9d43-1f3b7ad1a9e2")

SLOT_LABELS = ("appliance-a", "appliance-b")
SLOT_LETTERS = ("a", "b")
DATA_LABEL = "appliance-data"
ESP_LABEL = "APPLIANCE"
# grubenv: the default slot, and a slot armed for one trial boot (GRUB clears it as it takes it).
GRUBENV_SLOT = "appliance_slot"
GRUBENV_TRIAL = "appliance_trial"

BIOS_BOOT_BYTES = 1 * MiB
ESP_BYTES = 64 * MiB
DATA_BYTES = 64 * MiB
SLOT_ALIGN = 64 * MiB
# Room for ext4's own metadata and journal around the slot's files.
SLOT_OVERHEAD = 1.1

# GRUB's boot.img (sector 0). It may own the MBR's code area only: the BIOS
# parameter block it jumps over and the protective MBR from 0x1B8 on stay.
BOOT_CODE_END = 0x1B8
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C  # u64 LBA of core.img's first sector
DRIVE_CHECK = 0x66  # a jmp that trusts the BIOS's drive number; NOPs on hard disks, as grub-bios-setup does
# core.img's first sector (diskboot.img) ends with a blocklist entry: u64 LBA,
# u16 sector count, u16 segment, for the rest of core.img.
BLOCKLIST_SIZE = 12
CORE_REST_SEGMENT = 0x820


# What a root slot (and the ISO's live/) holds: the live set, and two small files about the build.
LIVE_DIR = "live"
SQUASHFS_FILE = "filesystem.squashfs"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
LIVE_FILES = (KERNEL_FILE, INITRD_FILE, SQUASHFS_FILE)
# A GRUB script the disk's menu sources from the slot: that build's kernel command line.
BOOT_CFG_FILE = "boot.cfg"
# The build in the slot: name, build id, architecture, command line, each live file's size and sha256.
BUILD_INFO_FILE = "build.json"
# What the ISO carries besides live/ for `node install`: the disk's boot loader, made by the packer.
DISK_BOOT_DIR = "appliance/disk"
CORE_IMG = "core.img"  # i386-pc core.img, its blocklist already pointing into the BIOS boot partition
BOOT_IMG = "boot.img"  # GRUB's boot.img, merged into sector 0
EFI_IMG = "BOOTX64.EFI"
GRUB_CFG = "grub.cfg"
DISK_BOOT_FILES = (CORE_IMG, BOOT_IMG, EFI_IMG, GRUB_CFG)
# One kernel argument: no quoting, no spaces, nothing GRUB's script language or iPXE expands
# (the spec's own rule, appliance.spec CMDLINE_ARG_PATTERN).
CMDLINE_WORD = re.compile(r"^[A-Za-z0-9_.,:/=+@%-]+$")


class LayoutError(ValueError):
    """A layout or boot sector that cannot be made as asked."""


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # GPT name; the file systems carry it as their label too
    type_uuid: str
    start: int  # bytes
    size: int  # bytes
    uuid: str  # GPT partition UUID, unique to the build (partition_uuid)

    @property
    def start_lba(self) -> int:
        return self.start // SECTOR

    @property
    def size_lba(self) -> int:
        return self.size // SECTOR

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskLayout:
    partitions: tuple[Partition, ...]
    size: int  # bytes, the backup GPT included

    def partition(self, name: str) -> Partition:
        for partition in self.partitions:
            if partition.name == name:
                return partition
        raise KeyError(name)


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def slot_size(content_bytes: int, budget_bytes: int, kernel_and_initrd_bytes: int) -> int:
    """Bytes for each root slot: room for any later build that keeps to the size budget
    (a squashfs up to the budget, with a kernel and initrd like this build's), so an
    upgrade fits into the other slot; never less than this build's own files."""
    wanted = max(budget_bytes + kernel_and_initrd_bytes, content_bytes)
    return round_up(int(wanted * SLOT_OVERHEAD), SLOT_ALIGN)


def fits_slot(content_bytes: int, slot_bytes: int) -> bool:
    """Whether a build's files fit a slot of this size, with the room slot_size leaves for ext4."""
    return int(content_bytes * SLOT_OVERHEAD) <= slot_bytes


def partition_uuid(build_id: str, name: str) -> str:
    """A partition's GPT UUID, derived from the build: the same image flashed twice has the
    same, another build never does, so the kernel can be told which slot to boot by it."""
    return str(uuid.uuid5(PARTITION_UUID_NAMESPACE, f"{build_id}/{name}"))


def plan_layout(slot_bytes: int, build_id: str, esp_bytes: int = ESP_BYTES, data_bytes: int = DATA_BYTES) -> DiskLayout:
    """Partitions in order from 1 MiB on, each aligned to 1 MiB; 1 MiB spare at the end
    holds the backup GPT."""
    wanted = (
        ("bios", BIOS_BOOT_TYPE, BIOS_BOOT_BYTES),
        ("esp", ESP_TYPE, esp_bytes),
        (SLOT_LABELS[0], LINUX_TYPE, slot_bytes),
        (SLOT_LABELS[1], LINUX_TYPE, slot_bytes),
        (DATA_LABEL, DATA_TYPE, data_bytes),
    )
    partitions = []
    start = MiB
    for number, (name, type_uuid, size) in enumerate(wanted, start=1):
        if size % MiB:
            raise LayoutError(f"partition {name} is {size} bytes, not a whole number of MiB")
        partitions.append(Partition(number, name, type_uuid, start, size, partition_uuid(build_id, name)))
        start += size
    return DiskLayout(partitions=tuple(partitions), size=start + MiB)


def layout_for_disk(slot_bytes: int, build_id: str, disk_bytes: int) -> DiskLayout:
    """The disk image's layout on a whole disk: the data partition takes all the rest (an install)."""
    small = plan_layout(slot_bytes, build_id)
    rest = (disk_bytes - small.size) // MiB * MiB
    if rest < 0:
        raise LayoutError(f"the disk holds {disk_bytes} bytes; the appliance needs at least {small.size}")
    return plan_layout(slot_bytes, build_id, data_bytes=DATA_BYTES + rest)


def sfdisk_script(layout: DiskLayout, name: str) -> str:
    """The partition table as `sfdisk DISK < script` takes it: positions and sizes in sectors."""
    lines = [
        f"# GPT of the {name} disk image, for `sfdisk IMAGE < this file`.",
        "# Positions and sizes in 512-byte sectors, every partition aligned to 1 MiB.",
        "label: gpt",
        "unit: sectors",
        f"first-lba: {MiB // SECTOR}",
    ]
    lines += [
        f'start={p.start_lba}, size={p.size_lba}, type={p.type_uuid}, uuid={p.uuid}, name="{p.name}"'
        for p in layout.partitions
    ]
    return "\n".join(lines) + "\n"


def esp_serial(build_id: str) -> str:
    """The ESP's vfat volume serial as 8 hex digits: unique to the build, so GRUB finds
    this disk's ESP even when another disk carries an older appliance."""
    return hashlib.sha256(build_id.encode()).hexdigest()[:8].upper()


def grub_fs_uuid(serial: str) -> str:
    """How GRUB names a vfat serial: XXXX-XXXX."""
    return f"{serial[:4]}-{serial[4:]}"


def patch_boot_sector(current: bytes, boot_img: bytes, core_lba: int) -> bytes:
    """Sector 0 with GRUB's boot.img in its code area, pointed at core.img."""
    if len(current) != SECTOR or len(boot_img) != SECTOR:
        raise LayoutError(f"a boot sector is {SECTOR} bytes (got {len(current)} and {len(boot_img)})")
    sector = bytearray(current)
    sector[:BOOT_CODE_END] = boot_img[:BOOT_CODE_END]
    sector[BPB_START:BPB_END] = current[BPB_START:BPB_END]
    sector[KERNEL_SECTOR : KERNEL_SECTOR + 8] = core_lba.to_bytes(8, "little")
    sector[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(sector)


def patch_core_blocklist(core: bytes, core_lba: int) -> bytes:
    """core.img padded to whole sectors, its first sector told where the rest lies."""
    sectors = round_up(len(core), SECTOR) // SECTOR
    if sectors < 2:
        raise LayoutError(f"core.img is {len(core)} bytes; GRUB's is always more than one sector")
    padded = bytearray(core.ljust(sectors * SECTOR, b"\0"))
    entry = (
        (core_lba + 1).to_bytes(8, "little")
        + (sectors - 1).to_bytes(2, "little")
        + CORE_REST_SEGMENT.to_bytes(2, "little")
    )
    padded[SECTOR - BLOCKLIST_SIZE : SECTOR] = entry
    return bytes(padded)


def boot_cfg(kernel_cmdline: str, build_id: str) -> str:
    """The slot's boot.cfg: GRUB script setting the build's kernel command line, sourced by the disk's menu."""
    words = kernel_cmdline.split()
    bad = [word for word in words if not CMDLINE_WORD.fullmatch(word)]
    if not words or bad or not CMDLINE_WORD.fullmatch(build_id):
        raise LayoutError(f"not a kernel command line the disk's GRUB menu can take: {kernel_cmdline!r}")
    return (
        f"# Build {build_id}: read by the disk's GRUB menu (grub/grub.cfg on the ESP) from this root slot.\n"
        f'set appliance_cmdline="{" ".join(words)}"\n'
        f'set appliance_build="{build_id}"\n'
    )


def build_info(
    name: str, build_id: str, arch: str, kernel_cmdline: str, files: dict[str, tuple[int, str]]
) -> dict[str, Any]:
    """The slot's build.json: which build it holds, and each live file's size and sha256."""
    return {
        "name": name,
        "build_id": build_id,
        "arch": arch,
        "kernel_cmdline": kernel_cmdline,
        "files": {file: {"size_bytes": size, "sha256": sha256} for file, (size, sha256) in sorted(files.items())},
    }


def build_info_text(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True) + "\n"
