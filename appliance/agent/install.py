"""`node install`: a node booted from the ISO writes itself onto one of its disks (root).

The disk gets the disk image's own layout (appliance.agent.disklayout): the
same partitions, UUIDs and ESP serial as NAME.raw of the running build, GRUB
from the ISO's appliance/disk/ (the packer made it for this build), slot A
from the ISO's live/ (each file's sha256 checked against its build.json as it
is copied), an empty slot B, and a data partition over the rest of the disk
holding what the node has now: the agent's state, the SSH host key, the
first-boot configuration. After a reboot from the disk the node is the same
node, upgradable.

Refused: a disk that is not a whole disk, that is read-only, too small, holds
the medium the node booted from or anything mounted, swapped on or stacked
on, and one with partitions or any signature blkid knows unless `wipe`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.agent.disklayout import (
    BOOT_CFG_FILE,
    BOOT_IMG,
    BUILD_INFO_FILE,
    CORE_IMG,
    DATA_LABEL,
    DISK_BOOT_DIR,
    DISK_BOOT_FILES,
    EFI_IMG,
    ESP_LABEL,
    GRUB_CFG,
    GRUBENV_SLOT,
    GRUBENV_TRIAL,
    INITRD_FILE,
    KERNEL_FILE,
    LIVE_DIR,
    LIVE_FILES,
    SECTOR,
    SLOT_LABELS,
    DiskLayout,
    LayoutError,
    boot_cfg,
    esp_serial,
    layout_for_disk,
    patch_boot_sector,
    sfdisk_script,
    slot_size,
)
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.grubenv import render
from appliance.agent.lifecycle_config import FIRSTBOOT_SAVED, LifecycleConfig
from appliance.agent.slots import GOOD, RECORD_FILE, Record, SlotInfo, read_json, write_json
from appliance.agent.tools import find_program, run_tool

SYS_CLASS_BLOCK = Path("/sys/class/block")
WORK_DIR = Path("/run/appliance/install")
HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key")
STORAGE_DEVICE_MARKER = Path("/run/appliance/storage-device")
BLANK_DISK = "/usr/lib/appliance/blank-disk"
CHUNK = 1 << 20

Progress = Callable[[str], None]


def refuse(message: str) -> AgentError:
    return AgentError(ErrorCode.DISK_REFUSED, message)


@dataclass(frozen=True)
class Source:
    """The mounted medium the node booted from: live/ and appliance/disk/ of the running build."""

    device: str
    root: Path
    info: dict[str, Any]


def whole_disk_name(device: str) -> str:
    """/dev/sda -> sda, refused unless it is a whole disk the kernel knows."""
    path = Path(device)
    if path.parent != Path("/dev") or not (SYS_CLASS_BLOCK / path.name).exists():
        raise refuse(f"{device} is not a disk of this node (give /dev/NAME; `appliance node disks HOST` lists them)")
    if (SYS_CLASS_BLOCK / path.name / "partition").exists():
        raise refuse(f"{device} is a partition: give the whole disk")
    if not (SYS_CLASS_BLOCK / path.name / "device").exists():
        raise refuse(
            f"{device} is not a disk of its own (loop, RAM, device-mapper or RAID devices are not installed on)"
        )
    return path.name


def sys_value(name: str, item: str) -> str:
    try:
        return (SYS_CLASS_BLOCK / name / item).read_text().strip()
    except OSError:
        return ""


def partitions_of(name: str) -> list[str]:
    return sorted(child.name for child in (SYS_CLASS_BLOCK / name).glob(f"{name}*") if (child / "partition").exists())


def parent_disk(device: str) -> str:
    """The whole disk a device is (or is a partition of), by name."""
    name = Path(os.path.realpath(device)).name
    if (SYS_CLASS_BLOCK / name / "partition").exists():
        return Path(os.path.realpath(SYS_CLASS_BLOCK / name / "..")).name
    return name


def in_use(name: str) -> list[str]:
    """What holds the disk or its partitions: mounts, swap, stacked devices."""
    members = {name, *partitions_of(name)}
    uses = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        if source.startswith("/dev/") and Path(os.path.realpath(source)).name in members:
            uses.append(f"{source} is mounted on {target}")
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        if Path(os.path.realpath(line.split()[0])).name in members:
            uses.append(f"{line.split()[0]} is swap")
    for member in sorted(members):
        holders = sorted(path.name for path in (SYS_CLASS_BLOCK / member / "holders").glob("*"))
        if holders:
            uses.append(f"{member} holds {', '.join(holders)}")
    return uses


def signatures(device: str) -> str:
    """What blkid finds on the device itself ("" for nothing): a partition table, a file system, RAID, LVM."""
    blkid = find_program("blkid", "util-linux")
    done = subprocess.run([blkid, "-p", "-o", "export", device], capture_output=True, text=True, check=False)
    if done.returncode == 2:
        return ""
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return found.get("PTTYPE") or found.get("TYPE") or "a signature"


def list_disks() -> list[dict[str, Any]]:
    """The node's whole disks, and for each whether `node install` would take it and why not."""
    disks = []
    for entry in sorted(SYS_CLASS_BLOCK.iterdir()):
        name = entry.name
        if (entry / "partition").exists() or not (entry / "device").exists():
            continue
        device = f"/dev/{name}"
        sectors = int(sys_value(name, "size") or 0)
        reasons = in_use(name)
        if sys_value(name, "ro") == "1":
            reasons.append("read-only")
        parts = partitions_of(name)
        found = signatures(device) if not parts and not reasons else ""
        disks.append(
            {
                "disk": device,
                "size_bytes": sectors * SECTOR,
                "removable": sys_value(name, "removable") == "1",
                "model": sys_value(name, "device/model"),
                "partitions": [f"/dev/{part}" for part in parts],
                "signature": found,
                "blank": not parts and not found and not reasons,
                "in_use": reasons,
            }
        )
    return disks


def mount(device: str, target: Path, options: str = "ro") -> None:
    target.mkdir(parents=True, exist_ok=True)
    run_tool([find_program("mount", "mount"), "-o", options, device, str(target)])


def unmount(target: Path) -> None:
    with suppress(AgentError):
        run_tool([find_program("umount", "mount"), str(target)])


@contextmanager
def boot_medium(running_id: str, work: Path) -> Iterator[Source]:
    """The ISO the node booted from, mounted read-only: the medium whose live/build.json is the running build's."""
    blkid = find_program("blkid", "util-linux")
    listed = subprocess.run([blkid, "-o", "device", "-t", "TYPE=iso9660"], capture_output=True, text=True, check=False)
    seen = []
    for device in listed.stdout.split():
        target = work / "medium"
        try:
            mount(device, target)
        except AgentError:
            continue
        info = read_json(target / LIVE_DIR / BUILD_INFO_FILE)
        complete = all((target / DISK_BOOT_DIR / name).is_file() for name in DISK_BOOT_FILES)
        if isinstance(info, dict) and info.get("build_id") == running_id and complete:
            try:
                yield Source(device=device, root=target, info=info)
            finally:
                unmount(target)
            return
        seen.append(f"{device} ({info.get('build_id') if isinstance(info, dict) else 'no build.json'})")
        unmount(target)
    raise AgentError(
        ErrorCode.UNSUPPORTED,
        f"no medium of the running build {running_id} to install from"
        f"{' (found ' + ', '.join(seen) + ')' if seen else ''}: `node install` works on a node booted from this "
        "build's ISO; a node booted from the network has no kernel and initrd to install (flash NAME.raw instead)",
    )


def check_target(name: str, wipe: bool, needed: int, source: Source) -> None:
    device = f"/dev/{name}"
    uses = in_use(name)
    if uses:
        raise refuse(f"{device} is in use: {'; '.join(uses)}")
    if parent_disk(source.device) == name:
        raise refuse(f"{device} holds the medium this node booted from")
    with suppress(OSError):
        data_device = STORAGE_DEVICE_MARKER.read_text().strip()
        if data_device and parent_disk(data_device) == name:
            raise refuse(f"{device} holds the node's data partition in use ({data_device})")
    if sys_value(name, "ro") == "1":
        raise refuse(f"{device} is read-only")
    size = int(sys_value(name, "size") or 0) * SECTOR
    if size < needed:
        raise refuse(f"{device} holds {size / 1e9:.2f} GB; the appliance needs at least {needed / 1e9:.2f} GB")
    if wipe:
        return
    parts = partitions_of(name)
    if parts:
        raise refuse(f"{device} has partitions ({', '.join('/dev/' + p for p in parts)}): give --wipe to erase them")
    found = signatures(device)
    if found:
        raise refuse(f"{device} holds {found}: give --wipe to erase it")


def wait_for_partitions(name: str, count: int, timeout: float = 30.0) -> None:
    udevadm = shutil.which("udevadm") or "/usr/bin/udevadm"
    deadline = time.monotonic() + timeout
    while len(partitions_of(name)) < count:
        if time.monotonic() >= deadline:
            raise AgentError(ErrorCode.TOOL_FAILED, f"the kernel did not see the new partitions of /dev/{name}")
        time.sleep(0.5)
    subprocess.run([udevadm, "settle", "--timeout=30"], check=False, capture_output=True)


def copy_checked(source: Path, target: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        for block in iter(lambda: reader.read(CHUNK), b""):
            digest.update(block)
            writer.write(block)
        writer.flush()
        os.fsync(writer.fileno())
    if digest.hexdigest() != sha256:
        raise AgentError(ErrorCode.CHECKSUM_MISMATCH, f"{source}: sha256 {digest.hexdigest()}, the build says {sha256}")


def write_boot_loader(disk: str, layout: DiskLayout, source: Path, build_id: str, work: Path) -> None:
    bios = layout.partition("bios")
    core = (source / CORE_IMG).read_bytes()
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, core, bios.start)
        sector0 = os.pread(fd, SECTOR, 0)
        os.pwrite(fd, patch_boot_sector(sector0, (source / BOOT_IMG).read_bytes(), bios.start_lba), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    esp = partition_device(disk, layout.partition("esp").number)
    run_tool([find_program("mkfs.vfat", "dosfstools"), "-F", "32", "-s", "1", "-n", ESP_LABEL,
              "-i", esp_serial(build_id), esp])  # fmt: skip
    grubenv = work / "grubenv"
    grubenv.write_bytes(render({GRUBENV_SLOT: "a", GRUBENV_TRIAL: ""}))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    mmd, mcopy = find_program("mmd", "mtools"), find_program("mcopy", "mtools")
    run_tool([mmd, "-i", esp, "::/EFI", "::/EFI/BOOT", "::/grub"], env=env)
    run_tool([mcopy, "-i", esp, str(source / EFI_IMG), "::/EFI/BOOT/BOOTX64.EFI"], env=env)
    run_tool([mcopy, "-i", esp, str(source / GRUB_CFG), str(grubenv), "::/grub/"], env=env)


def partition_device(disk: str, number: int) -> str:
    name = Path(disk).name
    for part in partitions_of(name):
        if sys_value(part, "partition") == str(number):
            return f"/dev/{part}"
    raise AgentError(ErrorCode.TOOL_FAILED, f"no partition {number} on {disk}")


def mkfs_ext4(device: str, label: str, kind: str) -> None:
    run_tool([find_program("mke2fs", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-T", kind, "-L", label, device])


def write_slot(device: str, source: Source, work: Path) -> None:
    mkfs_ext4(device, SLOT_LABELS[0], "largefile")
    target = work / "slot"
    mount(device, target, "rw")
    try:
        live = target / LIVE_DIR
        live.mkdir()
        for file in LIVE_FILES:
            copy_checked(source.root / LIVE_DIR / file, live / file, source.info["files"][file]["sha256"])
        (live / BOOT_CFG_FILE).write_text(boot_cfg(source.info["kernel_cmdline"], source.info["build_id"]))
        shutil.copyfile(source.root / LIVE_DIR / BUILD_INFO_FILE, live / BUILD_INFO_FILE)
        os.sync()
    finally:
        unmount(target)


def write_data(device: str, config: LifecycleConfig, running: dict[str, Any], work: Path) -> None:
    """The data partition as appliance-storage finds it: the state, the host key, the first-boot config."""
    mkfs_ext4(device, DATA_LABEL, "default")
    target = work / "data"
    mount(device, target, "rw,nodev,nosuid")
    try:
        state = target / "state"
        state.mkdir(mode=0o750)
        if config.state_dir.is_dir():
            run_tool([find_program("cp", "coreutils"), "-a", "--sparse=always", f"{config.state_dir}/.", str(state)])
        shutil.chown(state, config.agent_user, config.agent_user)
        ssh = target / "ssh"
        ssh.mkdir(mode=0o700)
        if HOST_KEY.is_file():
            shutil.copy2(HOST_KEY, ssh / HOST_KEY.name)
        if config.firstboot_seed.is_dir():
            # The provisioner's configuration this node took at boot: the disk keeps applying it.
            shutil.copytree(config.firstboot_seed, target / FIRSTBOOT_SAVED)
        record = Record()
        record.slots["a"] = SlotInfo(GOOD, str(running.get("build_id", "")), str(running.get("name", "")), time.time())
        lifecycle = target / "lifecycle"
        lifecycle.mkdir(mode=0o700)
        write_json(lifecycle / RECORD_FILE, record.to_json())
        os.sync()
    finally:
        unmount(target)


def first_blank_disk() -> str:
    """The disk blank-disk picks (appliance-data's rule: fixed, writable, at least 1 GiB, nothing on it)."""
    done = subprocess.run([BLANK_DISK], capture_output=True, text=True, check=False)
    disk = done.stdout.strip()
    if not disk:
        raise refuse("no blank disk on this node (fixed, writable, no partitions, no signature)")
    return disk


def install(config: LifecycleConfig, disk: str, wipe: bool, progress: Progress) -> dict[str, Any]:
    """Write the running build onto DISK; PROGRESS hears each step as it starts."""
    name = whole_disk_name(disk)
    running = read_json(config.build_info)
    running = running if isinstance(running, dict) else {}
    started = time.monotonic()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as work_name:
        work = Path(work_name)
        with boot_medium(str(running.get("build_id", "")), work) as source:
            files = source.info["files"]
            content = sum(int(files[file]["size_bytes"]) for file in LIVE_FILES)
            extra = int(files[KERNEL_FILE]["size_bytes"]) + int(files[INITRD_FILE]["size_bytes"])
            slot = slot_size(content, config.size_budget_mb * 1_000_000, extra)
            size = int(sys_value(name, "size") or 0) * SECTOR
            try:
                layout = layout_for_disk(slot, source.info["build_id"], max(size, 0))
            except LayoutError as error:
                raise refuse(f"{disk}: {error}") from error
            check_target(name, wipe, layout.size, source)
            progress(f"partition {disk} ({size / 1e9:.1f} GB) as the disk image of {source.info['build_id']}")
            if wipe:
                run_tool([find_program("wipefs", "util-linux"), "--all", "--force", disk])
            sfdisk = find_program("sfdisk", "fdisk")
            done = subprocess.run([sfdisk, "--quiet", "--wipe", "always", "--wipe-partitions", "always", disk],
                                  input=sfdisk_script(layout, str(running.get("name", ""))), text=True,
                                  capture_output=True, check=False)  # fmt: skip
            if done.returncode != 0:
                raise AgentError(ErrorCode.TOOL_FAILED, f"sfdisk failed on {disk}: {done.stderr.strip()[-300:]}")
            wait_for_partitions(name, len(layout.partitions))
            # The boot loader last: a disk cut off before it has no boot code and no EFI binary, so the
            # firmware goes on to the next boot device (the ISO) instead of a half-written disk.
            progress(f"write slot A ({content / 1e6:.0f} MB, each file's sha256 checked)")
            write_slot(partition_device(disk, layout.partition(SLOT_LABELS[0]).number), source, work)
            progress("format slot B")
            mkfs_ext4(partition_device(disk, layout.partition(SLOT_LABELS[1]).number), SLOT_LABELS[1], "largefile")
            progress("write the data partition: the agent's state, the SSH host key, the first-boot configuration")
            write_data(partition_device(disk, layout.partition(DATA_LABEL).number), config, running, work)
            progress("write the boot loader (BIOS and UEFI) and the ESP")
            write_boot_loader(disk, layout, source.root / DISK_BOOT_DIR, source.info["build_id"], work)
    progress(f"installed on {disk} in {time.monotonic() - started:.0f}s")
    return {
        "disk": disk,
        "build_id": running.get("build_id", ""),
        "partitions": [{"name": p.name, "start": p.start, "size_bytes": p.size} for p in layout.partitions],
        "seconds": round(time.monotonic() - started, 1),
    }
