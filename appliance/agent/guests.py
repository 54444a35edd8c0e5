"""Guest lifecycle on QEMU: disks, start, stop, pause, info, delete.

Guests are separate processes: QEMU daemonizes with a pid file and a QMP
socket in the guest's directory, so an agent that restarts (or the next one,
since every SSH connection runs its own) finds every running guest again from
those two files. State is never cached: it is read from the pid and QMP.
Who keeps QEMU running (a systemd unit, or QEMU itself) is the hypervisor's
supervisor (supervisors.py).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.agent import media, nics, seed
from appliance.agent.accel import AccelChoice
from appliance.agent.crashpoints import crash_point
from appliance.agent.errors import AgentError, ErrorCode, guest_exists, guest_not_running, image_not_found
from appliance.agent.host import read_bridges, read_meminfo
from appliance.agent.locks import LockTimeout, held
from appliance.agent.model import CPU_FIELDS, BootDevice, Disk, GuestSpec, check_name, parse_cpu_limits, updated_spec
from appliance.agent.policy import Capacity, Policy, check_create, check_disks, check_start
from appliance.agent.qemu import MACHINE, base_argv, qmp_session, request_powerdown, running_pid, wait_gone
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles, ProcessSupervisor, Supervisor
from appliance.agent.tools import run_tool

QEMU_IMG = "qemu-img"
CONSOLE_TAIL_MAX = 64 * 1024
# How long a QMP answer is awaited, unless the caller knows QEMU may be slower (qemu.qmp_session's default).
QMP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Hypervisor:
    """This node as guests see it: where they live, how QEMU runs, who supervises it, the policy."""

    state_dir: Path
    accel: AccelChoice
    policy: Policy = field(default_factory=Policy)
    supervisor: Supervisor = field(default_factory=ProcessSupervisor)
    network: nics.NetworkConfig = field(default_factory=nics.NetworkConfig)
    # How a guest's launcher (launch.py) runs this agent again.
    agent_command: tuple[str, ...] = (sys.executable, "-m", "appliance.agent")

    def capacity(self) -> Capacity:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        store = os.statvfs(self.state_dir)
        return Capacity(
            memory_total_bytes=read_meminfo().get("MemTotal", 0),
            cpus=os.cpu_count() or 1,
            storage_total_bytes=store.f_blocks * store.f_frsize,
        )

    @property
    def guests_dir(self) -> Path:
        return self.state_dir / "guests"

    @property
    def kept_disks_dir(self) -> Path:
        """Where a deleted guest's disks go, unless the delete asked to remove them."""
        return self.state_dir / "kept-disks"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    def paths(self, name: str) -> GuestFiles:
        return GuestFiles(self.guests_dir / check_name(name))

    def image(self, name: str) -> Path:
        path = self.images_dir / check_name(name)
        if not path.is_file():
            raise image_not_found(name)
        return path


def image_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run_tool([QEMU_IMG, "info", "--output=json", str(path)]))
    return info


def image_format(path: Path) -> str:
    """What qemu-img makes of an image (raw, qcow2, ...): names do not say."""
    return str(image_info(path)["format"])


def disks_bytes(host: Hypervisor, spec: GuestSpec, sizes: dict[str, int]) -> int:
    """The guest's disks at their full size; `sizes` caches base images' virtual sizes by name."""
    total = 0
    for disk in spec.disks:
        if disk.base_image:
            if disk.base_image not in sizes:
                try:
                    sizes[disk.base_image] = int(image_info(host.image(disk.base_image))["virtual-size"])
                except AgentError:
                    sizes[disk.base_image] = 0  # an image gone missing: create says so on its own
            # A disk over an image that was grown is as large as it was grown to.
            total += max(sizes[disk.base_image], disk.size_gib << 30)
        else:
            total += disk.size_gib << 30
    return total


# A guest is made in guests/.creating-PID-NAME and renamed to guests/NAME once its row is
# committed; a deleted one is moved to .deleting-PID-NAME (or kept-disks/) before its row
# goes. Whatever prefix of either an agent killed half way leaves, repair.py finishes or
# undoes it at the next agent's start.
CREATING_PREFIX = ".creating-"
DELETING_PREFIX = ".deleting-"
# How long a state query waits for a starting or exiting QEMU to answer or go.
STATE_WAIT = 10.0
STATE_POLL_SECONDS = 0.05
# How long an operation on a guest waits for another one on the same guest (a stop may take a minute).
OPERATION_WAIT = 120.0


@contextmanager
def operation(host: Hypervisor, name: str) -> Iterator[None]:
    """One change to a guest at a time, across every agent process on the node."""
    try:
        with held(host.state_dir / "locks" / f"guest-{check_name(name)}.lock", OPERATION_WAIT):
            yield
    except LockTimeout as error:
        raise AgentError(ErrorCode.GUEST_BUSY, f"guest {name!r} is busy with another operation: {error}") from error


def work_dir(host: Hypervisor, prefix: str, name: str) -> Path:
    return host.guests_dir / f"{prefix}{os.getpid()}-{name}"


def create_guest(host: Hypervisor, store: Store, spec: GuestSpec) -> dict[str, Any]:
    """Disks in a private directory, then the row, then the directory under the guest's name."""
    spec = nics.assign_nics(spec, store.guests(), host.network)
    media.check_cdrom(store, host.images_dir, spec)
    capacity = host.capacity()
    defined = store.guests()
    check_create(host.policy, capacity, defined, spec)
    sizes: dict[str, int] = {}
    defined_bytes = sum(disks_bytes(host, other, sizes) for other in defined)
    check_disks(host.policy, capacity, defined_bytes, disks_bytes(host, spec, sizes), spec.name)
    with operation(host, spec.name):
        paths = host.paths(spec.name)
        if store.has_guest(spec.name) or paths.directory.exists():
            raise guest_exists(spec.name)
        making = GuestFiles(work_dir(host, CREATING_PREFIX, spec.name))
        making.directory.mkdir(parents=True)
        try:
            make_disks(host, spec, making)
            if spec.cloud_init:
                seed.ensure_seed(making.directory, spec.name, spec.cloud_init)
            crash_point("guest-create:disks")
            store.add_guest(spec)
        except BaseException:
            shutil.rmtree(making.directory, ignore_errors=True)
            raise
        crash_point("guest-create:row")
        making.directory.rename(paths.directory)
    return spec.to_json()


def make_disks(host: Hypervisor, spec: GuestSpec, files: GuestFiles) -> None:
    for disk in spec.disks:
        make_disk(host, disk, files.disk(disk))
    if spec.kernel_boot:
        host.image(spec.kernel_boot.kernel_image)
        if spec.kernel_boot.initrd_image:
            host.image(spec.kernel_boot.initrd_image)


def make_disk(host: Hypervisor, disk: Disk, path: Path, size_bytes: int = 0) -> None:
    """A disk's file: a qcow2 over its base image (grown to size_gib if it was), or blank; `size_bytes`,
    when given, is its exact size (a disk arriving by migration is as large as it is on its node)."""
    size = [str(size_bytes)] if size_bytes else [f"{disk.size_gib}G"] if disk.size_gib else []
    if disk.base_image:
        base = host.image(disk.base_image)
        run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", image_format(base), "-b", str(base), str(path),
                  *size])  # fmt: skip
    else:
        run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), *size])


def drive_id(disk: Disk) -> str:
    """QEMU's name for a disk's drive: its file's, which stays the same while it is attached."""
    return Path(disk.file).stem


def qemu_argv(
    host: Hypervisor, spec: GuestSpec, paths: GuestFiles, machine: str = MACHINE, incoming: Path | None = None
) -> list[str]:
    """QEMU's command line for the guest (through its launcher when it needs one). A guest arriving by
    migration runs as the machine type it has on its node, and its first start receives it (`incoming`:
    the launcher's marker file)."""
    name = f"guest={spec.name}"
    argv = [
        *base_argv(name, host.accel, spec.memory_mib, spec.vcpus, paths, paths.serial_socket, machine),
        "-no-user-config", "-sandbox", "on", "-daemonize",
        "-device", "virtio-balloon-pci,id=balloon0",
    ]  # fmt: skip
    boot = media.boot_indexes(spec)
    for number, disk in enumerate(spec.disks):
        # Named by its file, so QMP (block_resize) finds the same disk whatever its place in the list.
        drive, index = drive_id(disk), media.bootindex(boot, BootDevice.DISK, number)
        argv += ["-drive", f"file={paths.disk(disk)},if=none,id={drive},format=qcow2",
                 "-device", f"virtio-blk-pci,drive={drive}{index}"]  # fmt: skip
    if spec.cloud_init:
        # The NoCloud seed (made by create, or start, when missing), after the disks: they keep their names.
        cidata = seed.seed_path(paths.directory, spec.name, spec.cloud_init)
        argv += ["-drive", f"file={cidata},if=virtio,format=raw,readonly=on"]
    if spec.cdrom:
        argv += media.cdrom_argv(host.image(spec.cdrom), boot)
    nic_args, plan = nics.nic_argv(spec, paths.directory, host.network, boot.get(BootDevice.NETWORK))
    if incoming is not None:
        plan = replace(plan, incoming=str(incoming))
    argv += nic_args
    argv += media.boot_argv(spec)
    if spec.display:
        argv += media.display_argv(paths.vnc_socket)
    argv += media.hotplug_ports_argv()
    if spec.kernel_boot:
        argv += ["-kernel", str(host.image(spec.kernel_boot.kernel_image))]
        if spec.kernel_boot.initrd_image:
            argv += ["-initrd", str(host.image(spec.kernel_boot.initrd_image))]
        if spec.kernel_boot.cmdline:
            argv += ["-append", spec.kernel_boot.cmdline]
    return nics.launch_argv(host.agent_command, plan, argv)


def start_guest(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    with operation(host, name):
        return start_locked(host, store, name)


def start_locked(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    spec = store.guest(name)
    paths = host.paths(name)
    if running_pid(paths) is not None:
        raise AgentError(ErrorCode.GUEST_RUNNING, f"guest {name!r} is already running")
    running = [other for other in store.guests() if running_pid(host.paths(other.name)) is not None]
    check_start(host.policy, host.capacity(), running, spec)
    # The node's bridges may have changed since create; the seed may predate this agent.
    nics.check_nics_on_node(spec, host.network, read_bridges())
    if spec.cloud_init:
        seed.ensure_seed(paths.directory, spec.name, spec.cloud_init)
    started = time.monotonic()
    launch(host, spec, paths)
    return {"name": name, "pid": running_pid(paths), "seconds": round(time.monotonic() - started, 3)}


def launch(
    host: Hypervisor, spec: GuestSpec, paths: GuestFiles, machine: str = MACHINE, incoming: Path | None = None
) -> None:
    """QEMU started under the node's supervisor, with fresh sockets and console (qemu_argv's arguments)."""
    for stale in (paths.qmp_socket, paths.serial_socket, paths.vnc_socket, paths.console_log):
        stale.unlink(missing_ok=True)
    host.supervisor.start(spec, qemu_argv(host, spec, paths, machine, incoming), paths)


def start_autostart_guests(host: Hypervisor, store: Store) -> list[dict[str, Any]]:
    """Start every guest marked autostart that is not running; one failure does not stop the rest."""
    results: list[dict[str, Any]] = []
    for spec in store.guests():
        if not spec.autostart or running_pid(host.paths(spec.name)) is not None:
            continue
        try:
            results.append(start_guest(host, store, spec.name))
        except AgentError as error:
            results.append({"name": spec.name, "error": error.code, "message": str(error)})
    return results


@contextmanager
def qmp(host: Hypervisor, name: str, timeout: float = QMP_TIMEOUT) -> Iterator[QMPClient]:
    """A connected QMP session with a running guest (each answer awaited TIMEOUT seconds at most); QMP
    failures become agent errors."""
    paths = host.paths(name)
    if running_pid(paths) is None:
        raise guest_not_running(name)
    try:
        with qmp_session(paths, timeout) as client:
            yield client
    except QMPError as error:
        raise AgentError(ErrorCode.QMP_FAILED, f"guest {name!r}: {error}") from error


def guest_command(host: Hypervisor, store: Store, name: str, command: str) -> dict[str, Any]:
    """pause (stop) and resume (cont) through QMP."""
    store.guest(name)
    with operation(host, name), qmp(host, name) as client:
        client.execute(command)
    return guest_info(host, store, name)


def reboot_guest(host: Hypervisor, store: Store, name: str, mode: str, timeout: float) -> dict[str, Any]:
    """ "reset": the reset button (QMP system_reset), at once. "acpi": as `virsh reboot` does
    without a guest agent: an ACPI power-down (forced after `timeout`), then a start."""
    store.guest(name)
    with operation(host, name):
        paths, pid = running_guest(host, name)
        if mode == "reset":
            with qmp(host, name) as client:
                client.execute("system_reset")
            return {"name": name, "mode": mode, "forced": True, "pid": pid}
        forced = host.supervisor.stop(name, paths, pid, timeout)
        started = start_locked(host, store, name)
    return {"name": name, "mode": mode, "forced": forced, "pid": started["pid"]}


def update_guest(host: Hypervisor, store: Store, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A new definition for a guest: kept at once, in effect from its next start (CPU limits at once)."""
    with operation(host, name):
        spec = store.guest(name)
        others = [other for other in store.guests() if other.name != name]
        updated = nics.assign_nics(updated_spec(spec, changes), others, host.network)
        media.check_cdrom(store, host.images_dir, updated)
        check_create(host.policy, host.capacity(), others, updated)
        running = running_pid(host.paths(name)) is not None
        if running and (updated.cpu_weight, updated.cpu_quota_percent) != (spec.cpu_weight, spec.cpu_quota_percent):
            host.supervisor.set_cpu_live(updated)
        store.replace_guest(updated)
    changed = sorted(key for key, value in updated.to_json().items() if spec.to_json()[key] != value)
    return {
        "name": name,
        "definition": updated.to_json(),
        "changed": changed,
        "restart_needed": running and bool(set(changed) - CPU_FIELDS),
    }


def stop_guest(host: Hypervisor, store: Store, name: str, timeout: float) -> dict[str, Any]:
    """ACPI power-down, then force after `timeout` seconds."""
    store.guest(name)
    with operation(host, name):
        paths, pid = running_guest(host, name)
        return {"name": name, "forced": host.supervisor.stop(name, paths, pid, timeout)}


def running_guest(host: Hypervisor, name: str) -> tuple[GuestFiles, int]:
    """The guest's files and its QEMU's pid; guest_not_running when it has none."""
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is None:
        raise guest_not_running(name)
    return paths, pid


def powerdown_guest(host: Hypervisor, name: str) -> str:
    """A unit's ExecStop: ACPI power-down and wait, then leave the rest to systemd's SIGTERM.

    Without an agent's stop-timeout (a host shutdown), the guest gets a minute.
    """
    paths = host.paths(name)
    try:
        timeout = float(paths.stop_timeout.read_text())
    except (OSError, ValueError):
        timeout = 60.0
    paths.stop_timeout.unlink(missing_ok=True)
    pid = running_pid(paths)
    outcome = "clean"
    if pid is not None and timeout > 0:
        # QEMU not answering is no reason to stop here: systemd's SIGTERM follows.
        if not (request_powerdown(paths, timeout=5) and wait_gone(pid, timeout)):
            outcome = "forced"
    elif pid is not None:
        outcome = "forced"
    paths.last_stop.write_text(outcome + "\n")
    return outcome


def set_cpu(host: Hypervisor, store: Store, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Change a guest's CPU weight and quota: kept in its definition, applied live to its unit."""
    with operation(host, name):
        return set_cpu_locked(host, store, name, params)


def set_cpu_locked(host: Hypervisor, store: Store, name: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = store.guest(name)
    weight, quota = parse_cpu_limits(params, spec.vcpus, spec.cpu_weight, spec.cpu_quota_percent)
    running = running_pid(host.paths(name)) is not None
    updated = replace(spec, cpu_weight=weight, cpu_quota_percent=quota)
    if running:
        host.supervisor.set_cpu_live(updated)
    store.replace_guest(updated)
    return {"name": name, "cpu_weight": weight, "cpu_quota_percent": quota, "applied_live": running}


def set_memory(host: Hypervisor, store: Store, name: str, memory_mib: int) -> dict[str, Any]:
    """Change what the guest may use through its virtio balloon (up to its defined memory)."""
    spec = store.guest(name)
    if memory_mib > spec.memory_mib:
        raise AgentError(
            ErrorCode.INVALID_PARAMS, f"{memory_mib} MiB is more than the guest's defined {spec.memory_mib} MiB"
        )
    with operation(host, name), qmp(host, name) as client:
        client.execute("balloon", {"value": memory_mib * 1024 * 1024})
        actual = client.execute("query-balloon")["actual"]
    return {"name": name, "target_mib": memory_mib, "actual_mib": actual // (1024 * 1024)}


def kill_guest(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    store.guest(name)
    with operation(host, name):
        paths, pid = running_guest(host, name)
        host.supervisor.force_off(name, paths, pid)
    return {"name": name, "killed": True}


def guest_state(host: Hypervisor, name: str) -> tuple[str, int | None]:
    """What QEMU says the guest is doing; "stopped" without a QEMU.

    A QEMU that is starting (its pid file written, its monitor not yet
    listening) or exiting (its monitor closed) is asked again until it
    answers or is gone: only a QEMU that stays silent is "unknown".
    """
    paths = host.paths(name)
    deadline = time.monotonic() + STATE_WAIT
    while True:
        pid = running_pid(paths)
        if pid is None:
            return "stopped", None
        try:
            with qmp_session(paths, timeout=5) as client:
                status = client.execute("query-status")["status"]
            return ("running" if status == "running" else str(status)), pid
        except QMPError:
            if time.monotonic() >= deadline:
                return "unknown", pid
            time.sleep(STATE_POLL_SECONDS)


def guest_info(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    spec = store.guest(name)
    state, pid = guest_state(host, name)
    paths = host.paths(name)
    info: dict[str, Any] = {"name": name, "state": state, "pid": pid, "definition": spec.to_json(),
                            "console_log": str(paths.console_log),
                            "disks": [str(paths.disk(disk)) for disk in spec.disks]}  # fmt: skip
    if pid is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        info["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / ticks
        info["memory_actual_mib"] = balloon_actual_mib(paths)
        info["user"] = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
        info.update(host.supervisor.describe(name, pid))
    info["supervisor"] = host.supervisor.name
    return info


def balloon_actual_mib(paths: GuestFiles) -> int | None:
    """What the guest holds now after its balloon (None when QMP does not say)."""
    try:
        with qmp_session(paths, timeout=5) as client:
            return int(client.execute("query-balloon")["actual"]) // (1024 * 1024)
    except QMPError:
        return None


def resources_report(host: Hypervisor, store: Store) -> dict[str, Any]:
    """What guests hold of this node, for host.report."""
    counts: dict[str, int] = {}
    allocated_mib = 0
    for spec in store.guests():
        state, _ = guest_state(host, spec.name)
        counts[state] = counts.get(state, 0) + 1
        if state != "stopped":
            allocated_mib += spec.memory_mib
    host.state_dir.mkdir(parents=True, exist_ok=True)
    disk = os.statvfs(host.state_dir)
    return {
        "accelerator": host.accel.accel,
        "accelerator_reason": host.accel.reason,
        "memory_reserved_for_host_bytes": host.policy.reserved_memory_mib * 1024 * 1024,
        "memory_allocated_to_guests_bytes": allocated_mib * 1024 * 1024,
        "storage_total_bytes": disk.f_blocks * disk.f_frsize,
        "storage_free_bytes": disk.f_bavail * disk.f_frsize,
        "guests_by_state": counts,
        "guest_supervisor": host.supervisor.name,
        "load": list(os.getloadavg()),
        "policy": asdict(host.policy),
    }


def list_guests(host: Hypervisor, store: Store) -> list[dict[str, Any]]:
    listed = []
    for spec in store.guests():
        state, pid = guest_state(host, spec.name)
        listed.append(
            {"name": spec.name, "state": state, "pid": pid, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}
        )
    return listed


def console_tail(host: Hypervisor, store: Store, name: str, max_bytes: int) -> dict[str, Any]:
    store.guest(name)
    path = host.paths(name).console_log
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - max_bytes))
            data = log.read()
    except FileNotFoundError:
        data = b""
    return {"name": name, "text": data.decode(errors="replace")}


def delete_guest(host: Hypervisor, store: Store, name: str, force: bool, remove_disks: bool) -> dict[str, Any]:
    """The directory moves away first (to kept-disks/, or aside to be removed), then the row goes."""
    with operation(host, name):
        return delete_locked(host, store, name, force, remove_disks)


def delete_locked(host: Hypervisor, store: Store, name: str, force: bool, remove_disks: bool) -> dict[str, Any]:
    """delete_guest, for a caller that holds the guest's operation lock already (a migration leaving)."""
    paths = host.paths(name)
    spec = store.guest(name)
    pid = running_pid(paths)
    if pid is not None:
        if not force:
            raise AgentError(ErrorCode.GUEST_RUNNING, f"guest {name!r} is running; stop it first or pass force")
        host.supervisor.force_off(name, paths, pid)
    moved_to = work_dir(host, DELETING_PREFIX, name) if remove_disks else new_kept_dir(host, name)
    if paths.directory.exists():
        if not remove_disks:
            # Kept with its definition, so kept.restore can bring the guest back as it was.
            (paths.directory / KEPT_DEFINITION).write_text(json.dumps(spec.to_json()))
        paths.directory.rename(moved_to)
    crash_point("guest-delete:moved")
    store.remove_guest(name, missing_ok=True)
    crash_point("guest-delete:row")
    if remove_disks:
        shutil.rmtree(moved_to, ignore_errors=True)
        return {"name": name, "deleted": True, "disks_kept_in": None}
    return {"name": name, "deleted": True, "disks_kept_in": str(moved_to)}


# A kept guest directory's copy of the definition the guest had when it was deleted.
KEPT_DEFINITION = "definition.json"


def new_kept_dir(host: Hypervisor, name: str) -> Path:
    """kept-disks/NAME-TIME, with a counter when a delete of the same name came within the second."""
    host.kept_disks_dir.mkdir(parents=True, exist_ok=True)
    base = host.kept_disks_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate
