"""Guest lifecycle on QEMU: disks, start, stop, pause, info, delete.

Guests are separate processes: QEMU daemonizes with a pid file and a QMP
socket in the guest's directory, so an agent that restarts (or the next one,
since every SSH connection runs its own) finds every running guest again from
those two files. State is never cached: it is read from the pid and QMP.
On a systemd node the same QEMU runs as the guest's unit (units.py), which
adds restart policy, cgroup limits and a clean stop at host shutdown.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.agent.accel import QEMU, AccelChoice
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.host import read_meminfo
from appliance.agent.model import GuestSpec, check_name, parse_cpu_limits
from appliance.agent.policy import Capacity, Policy, check_create, check_start
from appliance.agent.processes import live_pid
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.tools import run_tool
from appliance.agent.units import UserManager, cgroup_limits, set_cpu_live, start_unit, stop_unit, unit_name

QEMU_IMG = "qemu-img"
CONSOLE_TAIL_MAX = 64 * 1024


@dataclass(frozen=True)
class GuestPaths:
    directory: Path

    @property
    def pid_file(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def stop_timeout(self) -> Path:
        """How long the unit's ExecStop waits for an ACPI power-down (0: not at all)."""
        return self.directory / "stop-timeout"

    @property
    def last_stop(self) -> Path:
        """What the unit's last ExecStop saw: "clean" or "forced"."""
        return self.directory / "last-stop"

    def disk(self, index: int) -> Path:
        return self.directory / f"disk{index}.qcow2"


@dataclass(frozen=True)
class Host:
    """Where guests live and how QEMU is run on this node."""

    state_dir: Path
    accel: AccelChoice
    policy: Policy = field(default_factory=Policy)
    # The user's systemd manager when guests run as units, else None.
    units: UserManager | None = None
    # How a unit's ExecStop runs this agent (its config and state dir included).
    agent_command: tuple[str, ...] = ()

    @property
    def supervisor(self) -> str:
        return "systemd" if self.units else "process"

    def capacity(self) -> Capacity:
        return Capacity(memory_total_bytes=read_meminfo().get("MemTotal", 0), cpus=os.cpu_count() or 1)

    @property
    def guests_dir(self) -> Path:
        return self.state_dir / "guests"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    def paths(self, name: str) -> GuestPaths:
        return GuestPaths(self.guests_dir / check_name(name))

    def image(self, name: str) -> Path:
        path = self.images_dir / check_name(name)
        if not path.is_file():
            raise AgentError(ErrorCode.IMAGE_NOT_FOUND, f"no image named {name!r} in the image store")
        return path


def image_format(path: Path) -> str:
    """What qemu-img makes of an image (raw, qcow2, ...): names do not say."""
    return str(json.loads(run_tool([QEMU_IMG, "info", "--output=json", str(path)]))["format"])


CREATING_PREFIX = ".creating-"


def repair_interrupted_creates(host: Host, store: Store) -> None:
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


def create_guest(host: Host, store: Store, spec: GuestSpec) -> dict[str, Any]:
    """Disks first, then the row; any failure removes what was made."""
    check_create(host.policy, host.capacity(), store.guests(), spec)
    paths = host.paths(spec.name)
    try:
        paths.directory.mkdir(parents=True)
    except FileExistsError as error:
        raise AgentError(ErrorCode.GUEST_EXISTS, f"a guest named {spec.name!r} already exists") from error
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
        store.add_guest(spec)
    except BaseException:
        shutil.rmtree(paths.directory, ignore_errors=True)
        raise
    marker.unlink()
    return spec.to_json()


def running_pid(paths: GuestPaths) -> int | None:
    """The pid of this guest's QEMU if it is alive (and really is QEMU)."""
    return live_pid(paths.pid_file, QEMU, str(paths.pid_file))


def qemu_argv(host: Host, spec: GuestSpec, paths: GuestPaths) -> list[str]:
    argv = [
        QEMU, "-name", f"guest={spec.name}", "-machine", f"q35,accel={host.accel.accel}",
        "-cpu", host.accel.cpu,
        "-smp", str(spec.vcpus), "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", "on",
        "-daemonize", "-pidfile", str(paths.pid_file),
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
        "-serial", f"file:{paths.console_log}",
        "-device", "virtio-balloon-pci,id=balloon0",
    ]  # fmt: skip
    for index, _ in enumerate(spec.disks):
        argv += ["-drive", f"file={paths.disk(index)},if=virtio,format=qcow2"]
    for index in range(spec.nics):
        argv += ["-netdev", f"user,id=net{index}", "-device", f"virtio-net-pci,netdev=net{index},romfile="]
    if spec.kernel_boot:
        argv += ["-kernel", str(host.image(spec.kernel_boot.kernel_image))]
        if spec.kernel_boot.initrd_image:
            argv += ["-initrd", str(host.image(spec.kernel_boot.initrd_image))]
        if spec.kernel_boot.cmdline:
            argv += ["-append", spec.kernel_boot.cmdline]
    return argv


def start_guest(host: Host, store: Store, name: str) -> dict[str, Any]:
    spec = store.guest(name)
    paths = host.paths(name)
    if running_pid(paths) is not None:
        raise AgentError(ErrorCode.GUEST_RUNNING, f"guest {name!r} is already running")
    running = [other for other in store.guests() if running_pid(host.paths(other.name)) is not None]
    check_start(host.policy, host.capacity(), running, spec)
    paths.qmp_socket.unlink(missing_ok=True)
    paths.console_log.unlink(missing_ok=True)
    started = time.monotonic()
    if host.units:
        stop_command = [*host.agent_command, "powerdown-guest", name]
        start_unit(host.units, spec, qemu_argv(host, spec, paths), paths.pid_file, stop_command)
    else:
        run_tool(qemu_argv(host, spec, paths))
    return {"name": name, "pid": running_pid(paths), "seconds": round(time.monotonic() - started, 3)}


def start_autostart_guests(host: Host, store: Store) -> list[dict[str, Any]]:
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
def qmp(host: Host, name: str) -> Iterator[QMPClient]:
    """A connected QMP session with a running guest; QMP failures become agent errors."""
    paths = host.paths(name)
    if running_pid(paths) is None:
        raise AgentError(ErrorCode.GUEST_NOT_RUNNING, f"guest {name!r} is not running")
    try:
        with QMPClient(paths.qmp_socket) as client:
            yield client
    except QMPError as error:
        raise AgentError(ErrorCode.QMP_FAILED, f"guest {name!r}: {error}") from error


def guest_command(host: Host, store: Store, name: str, command: str) -> dict[str, Any]:
    """pause (stop), resume (cont) and reboot (system_reset) through QMP."""
    store.guest(name)
    with qmp(host, name) as client:
        client.execute(command)
    return guest_info(host, store, name)


def wait_gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def stop_guest(host: Host, store: Store, name: str, timeout: float) -> dict[str, Any]:
    """ACPI power-down, then force after `timeout` seconds."""
    store.guest(name)
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is None:
        raise AgentError(ErrorCode.GUEST_NOT_RUNNING, f"guest {name!r} is not running")
    if host.units:
        # Through systemd, so a restart policy never brings back a guest an operator stopped.
        paths.stop_timeout.write_text(f"{timeout}\n")
        paths.last_stop.unlink(missing_ok=True)
        stop_unit(host.units, name)
        # No word from ExecStop means it never ran (the unit was still starting, say):
        # systemd's SIGTERM ended QEMU, which is a forced stop.
        forced = not (paths.last_stop.exists() and paths.last_stop.read_text().strip() == "clean")
        return {"name": name, "forced": forced}
    with qmp(host, name) as client:
        client.execute("system_powerdown")
    forced = not wait_gone(pid, time.monotonic() + timeout)
    if forced:
        kill_pid(pid)
    return {"name": name, "forced": forced}


def powerdown_guest(host: Host, name: str) -> str:
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
        try:
            with QMPClient(paths.qmp_socket, timeout=5) as client:
                client.execute("system_powerdown")
        except QMPError:
            pass  # QEMU not answering: systemd's SIGTERM follows.
        if not wait_gone(pid, time.monotonic() + timeout):
            outcome = "forced"
    elif pid is not None:
        outcome = "forced"
    paths.last_stop.write_text(outcome + "\n")
    return outcome


def set_cpu(host: Host, store: Store, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Change a guest's CPU weight and quota: kept in its definition, applied live to its unit."""
    spec = store.guest(name)
    weight, quota = parse_cpu_limits(params, spec.vcpus, spec.cpu_weight, spec.cpu_quota_percent)
    running = running_pid(host.paths(name)) is not None
    if running and not host.units:
        raise AgentError(
            ErrorCode.UNSUPPORTED,
            "live CPU limits need the guest to run as a systemd unit; this node has no systemd manager",
        )
    updated = replace(spec, cpu_weight=weight, cpu_quota_percent=quota)
    if running and host.units:
        set_cpu_live(host.units, updated)
    store.replace_guest(updated)
    return {"name": name, "cpu_weight": weight, "cpu_quota_percent": quota, "applied_live": running}


def set_memory(host: Host, store: Store, name: str, memory_mib: int) -> dict[str, Any]:
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


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, time.monotonic() + 10)


def kill_guest(host: Host, store: Store, name: str) -> dict[str, Any]:
    store.guest(name)
    pid = running_pid(host.paths(name))
    if pid is None:
        raise AgentError(ErrorCode.GUEST_NOT_RUNNING, f"guest {name!r} is not running")
    force_off(host, name, pid)
    return {"name": name, "killed": True}


def force_off(host: Host, name: str, pid: int) -> None:
    """End QEMU at once; a unit is stopped (no power-down) so its restart policy does not apply."""
    if host.units:
        host.paths(name).stop_timeout.write_text("0\n")
        stop_unit(host.units, name)
    else:
        kill_pid(pid)


def guest_state(host: Host, name: str) -> tuple[str, int | None]:
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


def guest_info(host: Host, store: Store, name: str) -> dict[str, Any]:
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
        if host.units:
            info["unit"] = unit_name(name)
            info["cgroup"] = cgroup_limits(pid)
    info["supervisor"] = host.supervisor
    return info


def balloon_actual_mib(paths: GuestPaths) -> int | None:
    """What the guest holds now after its balloon (None when QMP does not say)."""
    try:
        with QMPClient(paths.qmp_socket, timeout=5) as client:
            return int(client.execute("query-balloon")["actual"]) // (1024 * 1024)
    except QMPError:
        return None


def resources_report(host: Host, store: Store) -> dict[str, Any]:
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
        "guest_supervisor": host.supervisor,
        "load": list(os.getloadavg()),
        "policy": asdict(host.policy),
    }


def list_guests(host: Host, store: Store) -> list[dict[str, Any]]:
    listed = []
    for spec in store.guests():
        state, pid = guest_state(host, spec.name)
        listed.append(
            {"name": spec.name, "state": state, "pid": pid, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}
        )
    return listed


def console_tail(host: Host, store: Store, name: str, max_bytes: int) -> dict[str, Any]:
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


def delete_guest(host: Host, store: Store, name: str, force: bool, remove_disks: bool) -> dict[str, Any]:
    store.guest(name)
    paths = host.paths(name)
    pid = running_pid(paths)
    if pid is not None:
        if not force:
            raise AgentError(ErrorCode.GUEST_RUNNING, f"guest {name!r} is running; stop it first or pass force")
        force_off(host, name, pid)
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
