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

from appliance.agent import nics, seed
from appliance.agent.accel import AccelChoice
from appliance.agent.errors import AgentError, ErrorCode, guest_exists, guest_not_running, image_not_found
from appliance.agent.host import read_bridges, read_meminfo
from appliance.agent.model import GuestSpec, check_name, parse_cpu_limits
from appliance.agent.policy import Capacity, Policy, check_create, check_start
from appliance.agent.qemu import base_argv, request_powerdown, running_pid, wait_gone
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles, ProcessSupervisor, Supervisor
from appliance.agent.tools import run_tool

QEMU_IMG = "qemu-img"
CONSOLE_TAIL_MAX = 64 * 1024


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
        return Capacity(memory_total_bytes=read_meminfo().get("MemTotal", 0), cpus=os.cpu_count() or 1)

    @property
    def guests_dir(self) -> Path:
        return self.state_dir / "guests"

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


def image_format(path: Path) -> str:
    """What qemu-img makes of an image (raw, qcow2, ...): names do not say."""
    return str(json.loads(run_tool([QEMU_IMG, "info", "--output=json", str(path)]))["format"])


CREATING_PREFIX = ".creating-"


def repair_interrupted_creates(host: Hypervisor, store: Store) -> None:
    """Finish what an agent that died inside create_guest left behind.

    A create marks the guest directory with .creating-PID until its row is
    committed. A marker whose agent is gone means: row committed, drop the
    marker; no row, the directory is a half-made guest, remove it.
    """
    if not host.guests_dir.is_dir():
        return
    defined = {spec.name for spec in store.guests()}
    for marker in host.guests_dir.glob(f"*/{CREATING_PREFIX}*"):
        pid = marker.name.removeprefix(CREATING_PREFIX)
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        if marker.parent.name in defined:
            marker.unlink(missing_ok=True)
        else:
            shutil.rmtree(marker.parent, ignore_errors=True)


def create_guest(host: Hypervisor, store: Store, spec: GuestSpec) -> dict[str, Any]:
    """Disks first, then the row; any failure removes what was made."""
    spec = nics.assign_nics(spec, store.guests(), host.network)
    check_create(host.policy, host.capacity(), store.guests(), spec)
    paths = host.paths(spec.name)
    try:
        paths.directory.mkdir(parents=True)
    except FileExistsError as error:
        raise guest_exists(spec.name) from error
    marker = paths.directory / f"{CREATING_PREFIX}{os.getpid()}"
    marker.touch()
    try:
        for index, disk in enumerate(spec.disks):
            if disk.base_image:
                base = host.image(disk.base_image)
                run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", image_format(base),
                          "-b", str(base), str(paths.disk(index))])  # fmt: skip
            else:
                run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", str(paths.disk(index)), f"{disk.size_gib}G"])
        if spec.kernel_boot:
            host.image(spec.kernel_boot.kernel_image)
            if spec.kernel_boot.initrd_image:
                host.image(spec.kernel_boot.initrd_image)
        if spec.cloud_init:
            seed.ensure_seed(paths.directory, spec.name, spec.cloud_init)
        store.add_guest(spec)
    except BaseException:
        shutil.rmtree(paths.directory, ignore_errors=True)
        raise
    marker.unlink()
    return spec.to_json()


def qemu_argv(host: Hypervisor, spec: GuestSpec, paths: GuestFiles) -> list[str]:
    argv = [
        *base_argv(f"guest={spec.name}", host.accel, spec.memory_mib, spec.vcpus, paths),
        "-no-user-config", "-sandbox", "on", "-daemonize",
        "-device", "virtio-balloon-pci,id=balloon0",
    ]  # fmt: skip
    for index, _ in enumerate(spec.disks):
        argv += ["-drive", f"file={paths.disk(index)},if=virtio,format=qcow2"]
    if spec.cloud_init:
        # The NoCloud seed (made by create, or start, when missing), after the disks: they keep their names.
        cidata = seed.seed_path(paths.directory, spec.name, spec.cloud_init)
        argv += ["-drive", f"file={cidata},if=virtio,format=raw,readonly=on"]
    nic_args, plan = nics.nic_argv(spec, paths.directory, host.network)
    argv += nic_args
    if spec.kernel_boot:
        argv += ["-kernel", str(host.image(spec.kernel_boot.kernel_image))]
        if spec.kernel_boot.initrd_image:
            argv += ["-initrd", str(host.image(spec.kernel_boot.initrd_image))]
        if spec.kernel_boot.cmdline:
            argv += ["-append", spec.kernel_boot.cmdline]
    return nics.launch_argv(host.agent_command, plan, argv)


def start_guest(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
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
    paths.qmp_socket.unlink(missing_ok=True)
    paths.console_log.unlink(missing_ok=True)
    started = time.monotonic()
    host.supervisor.start(spec, qemu_argv(host, spec, paths), paths)
    return {"name": name, "pid": running_pid(paths), "seconds": round(time.monotonic() - started, 3)}


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
def qmp(host: Hypervisor, name: str) -> Iterator[QMPClient]:
    """A connected QMP session with a running guest; QMP failures become agent errors."""
    paths = host.paths(name)
    if running_pid(paths) is None:
        raise guest_not_running(name)
    try:
        with QMPClient(paths.qmp_socket) as client:
            yield client
    except QMPError as error:
        raise AgentError(ErrorCode.QMP_FAILED, f"guest {name!r}: {error}") from error


def guest_command(host: Hypervisor, store: Store, name: str, command: str) -> dict[str, Any]:
    """pause (stop), resume (cont) and reboot (system_reset) through QMP."""
    store.guest(name)
    with qmp(host, name) as client:
        client.execute(command)
    return guest_info(host, store, name)


def stop_guest(host: Hypervisor, store: Store, name: str, timeout: float) -> dict[str, Any]:
    """ACPI power-down, then force after `timeout` seconds."""
    store.guest(name)
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is None:
        raise guest_not_running(name)
    return {"name": name, "forced": host.supervisor.stop(name, paths, pid, timeout)}


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
    with qmp(host, name) as client:
        client.execute("balloon", {"value": memory_mib * 1024 * 1024})
        actual = client.execute("query-balloon")["actual"]
    return {"name": name, "target_mib": memory_mib, "actual_mib": actual // (1024 * 1024)}


def kill_guest(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    store.guest(name)
    pid = running_pid(host.paths(name))
    if pid is None:
        raise guest_not_running(name)
    host.supervisor.force_off(name, host.paths(name), pid)
    return {"name": name, "killed": True}


def guest_state(host: Hypervisor, name: str) -> tuple[str, int | None]:
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is None:
        return "stopped", None
    try:
        with QMPClient(paths.qmp_socket, timeout=5) as client:
            status = client.execute("query-status")["status"]
    except QMPError:
        return "unknown", pid
    return ("running" if status == "running" else str(status)), pid


def guest_info(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    spec = store.guest(name)
    state, pid = guest_state(host, name)
    paths = host.paths(name)
    info: dict[str, Any] = {"name": name, "state": state, "pid": pid, "definition": spec.to_json(),
                            "console_log": str(paths.console_log),
                            "disks": [str(paths.disk(index)) for index in range(len(spec.disks))]}  # fmt: skip
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
        with QMPClient(paths.qmp_socket, timeout=5) as client:
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
    store.guest(name)
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is not None:
        if not force:
            raise AgentError(ErrorCode.GUEST_RUNNING, f"guest {name!r} is running; stop it first or pass force")
        host.supervisor.force_off(name, paths, pid)
    store.remove_guest(name)
    if remove_disks:
        shutil.rmtree(paths.directory, ignore_errors=True)
        return {"name": name, "deleted": True, "disks_kept_in": None}
    # Kept disks move aside so the name is free again and nothing is lost.
    kept = host.state_dir / "kept-disks" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    if paths.directory.exists():
        paths.directory.rename(kept)
    return {"name": name, "deleted": True, "disks_kept_in": str(kept)}
