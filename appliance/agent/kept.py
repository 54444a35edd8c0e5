"""Deleted guests' disks, kept aside in kept-disks/ unless the delete asked to remove them:
listed, restored as a guest again (with the definition it had), or purged for good.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.agent.crashpoints import crash_point
from appliance.agent.errors import AgentError, ErrorCode, guest_exists
from appliance.agent.guests import KEPT_DEFINITION, Hypervisor, operation
from appliance.agent.model import check_name, guest_spec_from_json
from appliance.agent.policy import check_create
from appliance.agent.store import Store

# A restore moves the kept directory to guests/.restoring-PID-NAME, commits the row, then
# renames it to guests/NAME; repair.py finishes it, or puts the disks back, if the agent dies.
RESTORING_PREFIX = ".restoring-"


def kept_entry(host: Hypervisor, kept: object) -> Path:
    """A kept directory named exactly as kept.list shows it (never a path of the caller's making)."""
    names = {entry.name for entry in host.kept_disks_dir.iterdir()} if host.kept_disks_dir.is_dir() else set()
    if not isinstance(kept, str) or kept not in names:
        raise AgentError(ErrorCode.KEPT_NOT_FOUND, f"nothing kept as {kept!r}; kept.list shows what is")
    return host.kept_disks_dir / kept


# Beside a disk removed from a guest (disks.py): the guest's name and the disk's definition.
REMOVED_DISK = "removed-disk.json"


def describe(entry: Path) -> dict[str, Any]:
    files = [path for path in entry.rglob("*") if path.is_file()]
    definition = read_definition(entry)
    if definition is None:
        return describe_removed_disk(entry, files)
    return {
        "kept": entry.name,
        "guest": definition.get("name", "") if definition else "",
        "kept_since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry.stat().st_mtime)),
        "disks": sorted(path.name for path in files if path.suffix == ".qcow2"),
        "size_bytes": sum(path.stat().st_blocks * 512 for path in files),
        "restorable": definition is not None,
        # The store images its disks are copy-on-write over: image.delete keeps them for a restore.
        "images": sorted(guest_spec_from_json(definition).images_used()) if definition else [],
    }


def describe_removed_disk(entry: Path, files: list[Path]) -> dict[str, Any]:
    """A disk removed from a guest (or disks an older agent kept without a definition): not restorable
    as a guest; the image a removed disk is over is kept for it all the same."""
    note = read_definition(entry, REMOVED_DISK) or {}
    disk = note.get("disk") if isinstance(note.get("disk"), dict) else {}
    base = disk.get("base_image") if isinstance(disk, dict) else ""
    return {
        "kept": entry.name,
        "guest": str(note.get("guest", "")),
        "kept_since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry.stat().st_mtime)),
        "disks": sorted(path.name for path in files if path.suffix == ".qcow2"),
        "size_bytes": sum(path.stat().st_blocks * 512 for path in files),
        "restorable": False,
        "images": [base] if isinstance(base, str) and base else [],
    }


def read_definition(entry: Path, name: str = KEPT_DEFINITION) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_kept(host: Hypervisor) -> list[dict[str, Any]]:
    if not host.kept_disks_dir.is_dir():
        return []
    return [describe(entry) for entry in sorted(host.kept_disks_dir.iterdir()) if entry.is_dir()]


def restore(host: Hypervisor, store: Store, kept: object, name: str | None) -> dict[str, Any]:
    """The kept guest back under its own name (or `name`), with its disks and definition."""
    entry = kept_entry(host, kept)
    definition = read_definition(entry)
    if definition is None:
        raise AgentError(
            ErrorCode.UNSUPPORTED,
            f"{entry.name} has no guest definition (a disk removed from a guest, or kept by an older agent): "
            "its disks stay where they are",
        )
    kept_spec = guest_spec_from_json(definition)
    spec = replace(kept_spec, name=check_name(name)) if name is not None else kept_spec
    check_create(host.policy, host.capacity(), store.guests(), spec)
    with operation(host, spec.name):
        target = host.paths(spec.name).directory
        if store.has_guest(spec.name) or target.exists():
            raise guest_exists(spec.name)
        moving = host.guests_dir / f"{RESTORING_PREFIX}{os.getpid()}-{spec.name}"
        host.guests_dir.mkdir(parents=True, exist_ok=True)
        entry.rename(moving)
        try:
            store.add_guest(spec)
        except BaseException:
            moving.rename(entry)
            raise
        crash_point("kept-restore:row")
        (moving / KEPT_DEFINITION).unlink(missing_ok=True)
        moving.rename(target)
    return spec.to_json()


def purge(host: Hypervisor, kept: object) -> dict[str, Any]:
    entry = kept_entry(host, kept)
    shutil.rmtree(entry)
    return {"kept": entry.name, "purged": True}
