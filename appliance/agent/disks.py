"""Disks of a defined guest: a new blank one added, one grown, one removed (its file kept aside).

Each change is ordered so that an agent killed at any step leaves either no
visible change or one that the next agent finishes (repair.py's repair_disks,
when an agent opens the store); work in progress carries the pid of the agent
doing it in its name, as guest creation does:

- add: the file is made as `.adding-PID-FILE` in the guest's directory, the
  definition naming FILE is committed, then the file is renamed to FILE.
  Repair renames a dead agent's file into place if the definition names it,
  else removes it. A running guest gets the disk at once where it can
  (hot-plugged into a spare PCIe root port), else at its next start.
- grow: a marker `.growing-PID-FILE` first, then the definition's new size,
  then the file grows (`qemu-img resize` when the guest is stopped, QMP
  `block_resize` when it runs). Repair grows a disk whose marker outlived its
  agent to the definition's size; never smaller (qemu-img refuses to shrink a
  qcow2 without --shrink; block_resize, which would shrink, is sent only after
  query-block, in the same monitor session, says the disk is smaller).
- remove (stopped guests only): the file is renamed to `.removing-PID-FILE`,
  the definition without it is committed, then the file moves to a directory
  of its own in kept-disks/, after a note of the guest and the disk (kept.py's
  REMOVED_DISK: the image it is over stays in the store while it is kept).
  Repair moves it back if the definition still names it, else finishes the move.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from appliance.agent.crashpoints import crash_point
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.guests import (
    QEMU_IMG,
    Hypervisor,
    disks_bytes,
    drive_id,
    image_info,
    make_disk,
    new_kept_dir,
    operation,
)
from appliance.agent.kept import REMOVED_DISK
from appliance.agent.media import HOTPLUG_PORT_PREFIX, HOTPLUG_PORTS
from appliance.agent.model import MAX_DISK_GIB, MAX_DISKS, BootDevice, Disk, GuestSpec, disk_file, invalid_field
from appliance.agent.policy import check_disks
from appliance.agent.qemu import qmp_session, running_pid
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles
from appliance.agent.tools import run_tool

ADDING_PREFIX = ".adding-"
GROWING_PREFIX = ".growing-"
REMOVING_PREFIX = ".removing-"
GIB = 1 << 30


def in_progress(directory: Path, prefix: str, file: str) -> Path:
    return directory / f"{prefix}{os.getpid()}-{file}"


def disk_at(spec: GuestSpec, index: object) -> Disk:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(spec.disks):
        has = f"0 to {len(spec.disks) - 1}" if spec.disks else "none: it has no disks"
        raise invalid_field("index", f"guest {spec.name!r} has no disk {index!r} (its disks: {has})")
    return spec.disks[index]


def check_storage(host: Hypervisor, store: Store, updated: GuestSpec) -> None:
    """Storage admission for the guest's disks as they would be (policy.check_disks)."""
    sizes: dict[str, int] = {}
    others = sum(disks_bytes(host, other, sizes) for other in store.guests() if other.name != updated.name)
    check_disks(host.policy, host.capacity(), others, disks_bytes(host, updated, sizes), updated.name)


def free_file(spec: GuestSpec, directory: Path) -> str:
    """The first diskN.qcow2 that no disk of the guest has and no file in its directory is."""
    used = {disk.file for disk in spec.disks}
    number = 0
    while disk_file(number) in used or (directory / disk_file(number)).exists():
        number += 1
    return disk_file(number)


def add_disk(host: Hypervisor, store: Store, name: str, size_gib: int) -> dict[str, Any]:
    with operation(host, name):
        spec = store.guest(name)
        if len(spec.disks) >= MAX_DISKS:
            raise invalid_field("disks", f"guest {name!r} has {len(spec.disks)} disks, the most a guest may have")
        paths = host.paths(name)
        disk = Disk(size_gib=size_gib, file=free_file(spec, paths.directory))
        updated = replace(spec, disks=(*spec.disks, disk))
        check_storage(host, store, updated)
        making = in_progress(paths.directory, ADDING_PREFIX, disk.file)
        try:
            make_disk(host, disk, making)
            crash_point("disk-add:file")
            store.replace_guest(updated)
        except BaseException:
            making.unlink(missing_ok=True)
            raise
        crash_point("disk-add:row")
        making.rename(paths.disk(disk))
        answer = {"name": name, "index": len(spec.disks), "file": disk.file, "size_gib": size_gib}
        if running_pid(paths) is None:
            return {**answer, "attached": "at start", "restart_needed": False}
        try:
            hot_plug(paths, disk)
        except QMPError as error:
            return {**answer, "attached": "at next start", "restart_needed": True, "hot_plug_failed": str(error)}
        return {**answer, "attached": "now", "restart_needed": False}


def hot_plug(paths: GuestFiles, disk: Disk) -> None:
    """The disk into the running guest, in a free spare root port."""
    drive = drive_id(disk)
    with qmp_session(paths) as client:
        port = free_port(client)
        client.execute("blockdev-add", {"driver": "qcow2", "node-name": drive,
                                        "file": {"driver": "file", "filename": str(paths.disk(disk))}})  # fmt: skip
        try:
            client.execute("device_add", {"driver": "virtio-blk-pci", "drive": drive, "id": drive, "bus": port})
        except QMPError:
            client.execute("blockdev-del", {"node-name": drive})
            raise


def free_port(client: QMPClient) -> str:
    for bus in client.execute("query-pci"):
        for device in bus["devices"]:
            bridge = device.get("pci_bridge")
            port = device.get("qdev_id", "")
            if port.startswith(HOTPLUG_PORT_PREFIX) and bridge is not None and not bridge.get("devices"):
                return str(port)
    raise QMPError(f"every spare PCIe port ({HOTPLUG_PORTS}) holds a hot-plugged disk already")


def current_bytes(paths: GuestFiles, disk: Disk, running: bool) -> int:
    """The disk's size now: QEMU's view when it runs (the file is locked), the file's otherwise."""
    if running:
        try:
            with qmp_session(paths) as client:
                return running_size(client, drive_id(disk))[0]
        except QMPError as error:
            raise AgentError(ErrorCode.QMP_FAILED, f"guest {paths.directory.name!r}: {error}") from error
    return int(image_info(paths.disk(disk))["virtual-size"])


def running_size(client: QMPClient, drive: str) -> tuple[int, str]:
    """A running disk's size and the node block_resize names: a disk of the command line is QEMU's
    drive `drive`, a hot-plugged one its block node `drive`."""
    for block in client.execute("query-block"):
        inserted = block.get("inserted") or {}
        if drive in (block.get("device"), inserted.get("node-name")):
            return int(inserted["image"]["virtual-size"]), str(inserted["node-name"])
    raise QMPError(f"QEMU has no disk {drive!r}: it was added since the guest started and not hot-plugged, "
                   "or the guest was started by an older agent; it is there after a restart")  # fmt: skip


def grow_disk(host: Hypervisor, store: Store, name: str, index: object, size_gib: int) -> dict[str, Any]:
    with operation(host, name):
        spec = store.guest(name)
        disk = disk_at(spec, index)
        paths = host.paths(name)
        running = running_pid(paths) is not None
        current = current_bytes(paths, disk, running)
        if size_gib * GIB <= current:
            raise invalid_field(
                "size_gib",
                f"disks[{index}] is {current / GIB:g} GiB already; a disk only grows: give more than that "
                f"(up to {MAX_DISK_GIB})",
            )
        grown = replace(disk, size_gib=size_gib)
        updated = replace(spec, disks=tuple(grown if item is disk else item for item in spec.disks))
        check_storage(host, store, updated)
        marker = in_progress(paths.directory, GROWING_PREFIX, disk.file)
        marker.touch()
        crash_point("disk-grow:marked")
        try:
            store.replace_guest(updated)
            crash_point("disk-grow:row")
            try:
                live = resize(paths, grown)
            except AgentError:
                store.replace_guest(spec)  # the definition says what the disk is
                raise
        finally:
            marker.unlink(missing_ok=True)
    return {"name": name, "index": index, "size_gib": size_gib, "was_bytes": current, "live": live}


def resize(paths: GuestFiles, disk: Disk) -> bool:
    """The disk's file grown to its size_gib, through QEMU while it runs; True when it did run."""
    target = disk.size_gib * GIB
    if running_pid(paths) is not None:
        try:
            with qmp_session(paths) as client:
                # In one monitor session: nobody else's block_resize comes between the look and the grow.
                size, node = running_size(client, drive_id(disk))
                if size < target:
                    client.execute("block_resize", {"node-name": node, "size": target})
            return True
        except QMPError as error:
            if running_pid(paths) is not None:
                raise AgentError(ErrorCode.QMP_FAILED, f"guest {paths.directory.name!r}: {error}") from error
            # It stopped meanwhile: its file is free for qemu-img.
    if int(image_info(paths.disk(disk))["virtual-size"]) < target:
        run_tool([QEMU_IMG, "resize", "-q", "-f", "qcow2", str(paths.disk(disk)), str(target)])
    return False


def remove_disk(host: Hypervisor, store: Store, name: str, index: object) -> dict[str, Any]:
    with operation(host, name):
        spec = store.guest(name)
        disk = disk_at(spec, index)
        paths = host.paths(name)
        if running_pid(paths) is not None:
            raise AgentError(
                ErrorCode.GUEST_RUNNING,
                f"guest {name!r} is running: stop it to remove a disk (a disk pulled from a running guest "
                "loses what its page cache still holds)",
            )
        updated = replace(spec, disks=tuple(item for item in spec.disks if item is not disk))
        if BootDevice.DISK in spec.boot_order and not updated.disks:
            raise invalid_field("index", "the guest boots from its disks (boot_order) and this is its last one")
        if not updated.devices():
            raise invalid_field("index", "this is all the guest has to boot from: give it another disk first")
        aside = in_progress(paths.directory, REMOVING_PREFIX, disk.file)
        paths.disk(disk).rename(aside)
        crash_point("disk-remove:moved")
        try:
            store.replace_guest(updated)
        except BaseException:
            aside.rename(paths.disk(disk))
            raise
        crash_point("disk-remove:row")
        kept = keep(host, name, aside, disk)
    return {"name": name, "index": index, "file": disk.file, "kept_in": str(kept)}


def keep(host: Hypervisor, name: str, path: Path, disk: Disk) -> Path:
    """A removed disk's file into kept-disks/NAME-DISK-TIME/ (kept.list shows it; kept.purge removes it),
    with a note of what it was, first: the image it is over stays in the store while it is kept."""
    kept = new_kept_dir(host, f"{name}-{Path(disk.file).stem}")
    kept.mkdir()
    (kept / REMOVED_DISK).write_text(json.dumps({"guest": name, "disk": asdict(disk)}))
    path.rename(kept / disk.file)
    return kept
