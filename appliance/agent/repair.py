"""What an agent killed half way through a change left behind, finished or undone by the next agent.

Every multi-step change is ordered so that each prefix is either invisible
or one of the states below; repair runs when an agent opens the store (each
SSH connection starts an agent, so a node repairs itself on first contact).
Work of an agent that is still alive is never touched: its pid is in the
name of what it is making.

Guests (guests.py): made in guests/.creating-PID-NAME, row committed, renamed
to guests/NAME; deleted by moving guests/NAME away (kept-disks/ or
.deleting-PID-NAME), then the row goes. Images (images.py): row committed,
then the verified upload linked into place; deleted file first, row second.
Disks of a defined guest (disks.py): .adding-, .growing- and .removing-PID-FILE
in its directory, finished or undone by repair_disks.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

from appliance.agent.disks import ADDING_PREFIX, GROWING_PREFIX, REMOVING_PREFIX, keep, resize
from appliance.agent.errors import AgentError
from appliance.agent.guests import CREATING_PREFIX, DELETING_PREFIX, Hypervisor, image_info
from appliance.agent.images import PARTIAL_PREFIX
from appliance.agent.kept import RESTORING_PREFIX
from appliance.agent.model import Disk, GuestSpec
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles

DISK_PREFIXES = (ADDING_PREFIX, GROWING_PREFIX, REMOVING_PREFIX)


def owner_alive(entry: Path, prefix: str) -> bool:
    """Whether the agent named in PREFIXPID-... still runs."""
    pid = entry.name.removeprefix(prefix).split("-", 1)[0]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def owned_name(entry: Path, prefix: str) -> str:
    return entry.name.removeprefix(prefix).split("-", 1)[1] if "-" in entry.name.removeprefix(prefix) else ""


def repair(host: Hypervisor, store: Store) -> None:
    repair_guests(host, store)
    repair_images(host, store)


def repair_guests(host: Hypervisor, store: Store) -> None:
    if not host.guests_dir.is_dir():
        return
    # Listed before the rows are read: a directory under a guest's name only ever appears
    # after its row was committed, so a row missing from the later read really is missing.
    entries = sorted(host.guests_dir.iterdir())
    defined = {spec.name for spec in store.guests()}
    for entry in entries:
        if entry.name.startswith(CREATING_PREFIX):
            if not owner_alive(entry, CREATING_PREFIX):
                finish_or_undo_create(host, entry, owned_name(entry, CREATING_PREFIX) in defined)
        elif entry.name.startswith(RESTORING_PREFIX):
            if not owner_alive(entry, RESTORING_PREFIX):
                finish_or_undo_restore(host, entry, owned_name(entry, RESTORING_PREFIX) in defined)
        elif entry.name.startswith(DELETING_PREFIX):
            if not owner_alive(entry, DELETING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name not in defined:
            set_aside_undefined(host, entry)
        else:
            remove_dead_markers(entry)
            repair_disks(host, store.guest(entry.name), entry)


def finish_or_undo_create(host: Hypervisor, entry: Path, row_committed: bool) -> None:
    target = host.guests_dir / owned_name(entry, CREATING_PREFIX)
    if row_committed and not target.exists():
        entry.rename(target)
    else:
        shutil.rmtree(entry, ignore_errors=True)


def finish_or_undo_restore(host: Hypervisor, entry: Path, row_committed: bool) -> None:
    """A restore cut short: the guest is back if its row was committed, else its disks go back."""
    target = host.guests_dir / owned_name(entry, RESTORING_PREFIX)
    if row_committed and not target.exists():
        entry.rename(target)
    else:
        host.kept_disks_dir.mkdir(parents=True, exist_ok=True)
        entry.rename(host.kept_disks_dir / f"{target.name}-{time.strftime('%Y%m%dT%H%M%S')}-restore-undone")


def set_aside_undefined(host: Hypervisor, entry: Path) -> None:
    """A guest directory with no row. A half-made create of an older agent (it holds a
    .creating-PID marker of a dead agent) is removed; anything else (a delete cut short)
    goes to kept-disks/, so the name is free again and nothing is lost."""
    markers = list(entry.glob(f"{CREATING_PREFIX}*"))
    if any(owner_alive(marker, CREATING_PREFIX) for marker in markers):
        return
    if markers:
        shutil.rmtree(entry, ignore_errors=True)
        return
    kept = host.kept_disks_dir / f"{entry.name}-{time.strftime('%Y%m%dT%H%M%S')}-repaired"
    kept.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # Its own delete finished meanwhile.
        entry.rename(kept)


def remove_dead_markers(directory: Path) -> None:
    """A defined guest's .creating-PID marker left by an older agent that died after the commit."""
    for marker in directory.glob(f"{CREATING_PREFIX}*"):
        if not owner_alive(marker, CREATING_PREFIX):
            marker.unlink(missing_ok=True)


def repair_disks(host: Hypervisor, spec: GuestSpec, directory: Path) -> None:
    """A defined guest's disk changes cut short (disks.py): an added disk's file into place if the
    definition names it, else removed; a grown disk grown to the definition's size; a removed disk's
    file back if the definition still names it, else on to kept-disks/."""
    paths = GuestFiles(directory)
    disks = {disk.file: disk for disk in spec.disks}
    for entry in sorted(directory.iterdir()):
        prefix = next((prefix for prefix in DISK_PREFIXES if entry.name.startswith(prefix)), None)
        if prefix is None or owner_alive(entry, prefix):
            continue
        file = owned_name(entry, prefix)
        named, target = file in disks, directory / file
        if prefix == GROWING_PREFIX:
            if named and target.exists():
                try:
                    resize(paths, disks[file])
                except AgentError as error:
                    # Not this connection's business to fail over: the marker stays for the next agent.
                    print(f"repair: {spec.name}: {file} not grown yet: {error}", file=sys.stderr)
                    continue
            entry.unlink(missing_ok=True)
        elif named and not target.exists():
            entry.rename(target)  # an add that committed, or a remove that did not
        elif prefix == ADDING_PREFIX:
            entry.unlink(missing_ok=True)
        else:
            # The definition no longer names it; the image it is over is named in the file itself.
            keep(host, spec.name, entry, Disk(base_image=base_image_of(host, entry), file=file))


def base_image_of(host: Hypervisor, disk: Path) -> str:
    """The store image a qcow2 is over, from its backing file ("" for none, or when qemu-img cannot say)."""
    try:
        backing = Path(str(image_info(disk).get("backing-filename", "")))
    except AgentError:
        return ""
    return backing.name if backing.parent == host.images_dir else ""


def repair_images(host: Hypervisor, store: Store) -> None:
    if not host.images_dir.is_dir():
        return
    # Listed before the rows are read: a file only appears after its row was committed.
    entries = sorted(host.images_dir.iterdir())
    uploading = set()
    for entry in entries:
        if entry.name.startswith(PARTIAL_PREFIX):
            if owner_alive(entry, PARTIAL_PREFIX):
                uploading.add(owned_name(entry, PARTIAL_PREFIX))
            else:
                entry.unlink(missing_ok=True)
    rows = {str(image["name"]) for image in store.images()}
    for entry in entries:
        if not entry.name.startswith(PARTIAL_PREFIX) and entry.name not in rows:
            entry.unlink(missing_ok=True)  # a row removed by an older agent's delete cut short
    for name in rows - uploading:
        if not (host.images_dir / name).exists():
            store.remove_image(name, missing_ok=True)  # an import cut short before its file was linked
