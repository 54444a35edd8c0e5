"""The disk the node booted from, its slots and ESP, found from the kernel command line and sysfs.

The disk's GRUB menu boots a slot with `live-media=/dev/disk/by-partuuid/UUID`
and `appliance.slot=a|b`; the slot's partition leads to its disk, and the
disk's GPT to the ESP and the other slot. Booted from the ISO or PXE, there is
none. A test (or a machine where this cannot be found) names the disk and the
booted slot in lifecycle.toml instead: then the disk may be a disk image file,
its partitions ranges of it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.disklayout import SLOT_LABELS, SLOT_LETTERS
from appliance.agent.gpt import GptError, GptPartition, read_gpt

PROC_CMDLINE = Path("/proc/cmdline")
SYS_CLASS_BLOCK = Path("/sys/class/block")
PARTUUID_PREFIX = "/dev/disk/by-partuuid/"


class BootDiskError(Exception):
    """The disk the node booted from cannot be read as the appliance's disk."""


@dataclass(frozen=True)
class Area:
    """Where a partition's bytes are: its own device (offset 0), or a range of a disk image file."""

    path: Path
    offset: int
    size: int


@dataclass(frozen=True)
class BootDisk:
    disk: Path
    partitions: tuple[GptPartition, ...]
    booted: str  # the slot letter the node runs from

    def partition(self, name: str) -> GptPartition:
        for partition in self.partitions:
            if partition.name == name:
                return partition
        raise BootDiskError(f"{self.disk} has no partition named {name!r}: not an appliance disk")

    @property
    def other(self) -> str:
        return SLOT_LETTERS[1 - SLOT_LETTERS.index(self.booted)]

    def slot(self, letter: str) -> GptPartition:
        return self.partition(SLOT_LABELS[SLOT_LETTERS.index(letter)])

    def area(self, partition: GptPartition) -> Area:
        if not is_block_device(self.disk):
            return Area(self.disk, partition.start, partition.size)
        return Area(partition_device(self.disk, partition.number), 0, partition.size)


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def partition_device(disk: Path, number: int, sys_class_block: Path = SYS_CLASS_BLOCK) -> Path:
    """/dev/vda and 3 -> /dev/vda3 (nvme0n1 -> nvme0n1p3), as sysfs lists the disk's partitions."""
    for child in sorted((sys_class_block / disk.name).glob(f"{disk.name}*")):
        try:
            if int((child / "partition").read_text()) == number:
                return disk.parent / child.name
        except (OSError, ValueError):
            continue
    raise BootDiskError(f"the kernel knows no partition {number} of {disk}")


def cmdline_values(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for word in text.split():
        name, _, value = word.partition("=")
        values[name] = value
    return values


def disk_of_partition(device: Path, sys_class_block: Path = SYS_CLASS_BLOCK) -> Path:
    """/dev/vda3 -> /dev/vda, through sysfs (a partition's directory sits inside its disk's)."""
    name = Path(os.path.realpath(device)).name
    entry = sys_class_block / name
    if not (entry / "partition").exists():
        raise BootDiskError(f"{device} is not a partition")
    return Path("/dev") / Path(os.path.realpath(entry / "..")).name


def disk_holding(partition_uuid: str, sys_class_block: Path = SYS_CLASS_BLOCK) -> Path:
    for entry in sorted(sys_class_block.iterdir()):
        if (entry / "partition").exists() or not (entry / "device").exists():
            continue
        disk = Path("/dev") / entry.name
        try:
            if any(partition.uuid == partition_uuid for partition in read_gpt(disk)):
                return disk
        except (GptError, OSError):
            continue
    raise BootDiskError(f"no disk holds partition {partition_uuid}")


def find_boot_disk(
    disk_override: str = "",
    booted_override: str = "",
    cmdline: Path = PROC_CMDLINE,
    sys_class_block: Path = SYS_CLASS_BLOCK,
) -> BootDisk | None:
    """The disk and slot the node booted from; None when it booted from the ISO or the network."""
    values = cmdline_values(cmdline.read_text()) if not disk_override else {}
    booted = booted_override or values.get("appliance.slot", "")
    if disk_override:
        disk = Path(disk_override)
        media_uuid = ""
    else:
        media = values.get("live-media", "")
        if not media.startswith(PARTUUID_PREFIX):
            return None
        media_uuid = media.removeprefix(PARTUUID_PREFIX).lower()
        if Path(media).exists():
            disk = disk_of_partition(Path(media), sys_class_block)
        else:
            # udev has not made the link (yet): the disk whose GPT holds that partition.
            disk = disk_holding(media_uuid, sys_class_block)
    try:
        partitions = tuple(read_gpt(disk))
    except (GptError, OSError) as error:
        raise BootDiskError(f"cannot read the partitions of {disk}: {error}") from error
    if media_uuid and not booted:
        # A disk made before GRUB passed appliance.slot: the slot booted is the one live-media names.
        for partition in partitions:
            if partition.uuid == media_uuid and partition.name in SLOT_LABELS:
                booted = SLOT_LETTERS[SLOT_LABELS.index(partition.name)]
    if booted not in SLOT_LETTERS:
        raise BootDiskError(f"cannot tell which slot of {disk} the node booted (appliance.slot={booted!r})")
    found = BootDisk(disk=disk, partitions=partitions, booted=booted)
    for name in ("esp", *SLOT_LABELS):
        found.partition(name)
    return found
