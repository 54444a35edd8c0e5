"""Who keeps a guest's QEMU running: two implementations of one small interface.

On a node whose PID 1 is systemd, each guest is a transient unit of the agent
user's systemd manager (units.py): systemd applies the restart policy and the
cgroup limits, and stops the guest through its ExecStop (an ACPI power-down
first) whenever it stops, host shutdown included. Elsewhere (this
repository's test machines) QEMU daemonizes itself and the agent signals it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.model import Disk, GuestSpec
from appliance.agent.qemu import QemuFiles, end_process, request_powerdown, wait_gone
from appliance.agent.tools import run_tool
from appliance.agent.units import UserManager, cgroup_limits, set_cpu_live, start_unit, stop_unit, unit_name


@dataclass(frozen=True)
class GuestFiles(QemuFiles):
    """A guest's directory: QEMU's files, its disks, and what its unit's ExecStop reads and writes."""

    @property
    def stop_timeout(self) -> Path:
        """How long the unit's ExecStop waits for an ACPI power-down (0: not at all)."""
        return self.directory / "stop-timeout"

    @property
    def last_stop(self) -> Path:
        """What the unit's last ExecStop saw: "clean" or "forced"."""
        return self.directory / "last-stop"

    def disk(self, disk: Disk) -> Path:
        return self.directory / disk.file

    @property
    def serial_socket(self) -> Path:
        """The serial console as a unix socket (QEMU logs it to console_log too), for guest.console_attach."""
        return self.directory / "serial.sock"

    @property
    def vnc_socket(self) -> Path:
        """QEMU's VNC server, for a guest with a display (guest.display_attach); no TCP port is opened."""
        return self.directory / "vnc.sock"


class Supervisor(Protocol):
    @property
    def name(self) -> str:
        """What guest.info and host.report call it: "systemd" or "process"."""

    def start(self, spec: GuestSpec, argv: list[str], files: GuestFiles) -> None:
        """Start QEMU (argv daemonizes with a pid file) under this supervisor."""

    def stop(self, name: str, files: GuestFiles, pid: int, timeout: float) -> bool:
        """ACPI power-down, forced after `timeout` seconds; True when it had to be forced."""

    def force_off(self, name: str, files: GuestFiles, pid: int) -> None:
        """End QEMU at once, so that no restart policy brings it back."""

    def set_cpu_live(self, spec: GuestSpec) -> None:
        """Apply the guest's CPU weight and quota to its running QEMU."""

    def describe(self, name: str, pid: int) -> dict[str, Any]:
        """What guest.info adds about a running guest under this supervisor."""


class ProcessSupervisor:
    """QEMU daemonized by itself; the agent signals it."""

    name = "process"

    def start(self, spec: GuestSpec, argv: list[str], files: GuestFiles) -> None:
        run_tool(argv)

    def stop(self, name: str, files: GuestFiles, pid: int, timeout: float) -> bool:
        if not request_powerdown(files, timeout=5):
            raise AgentError(ErrorCode.QMP_FAILED, f"guest {name!r}: QEMU did not take the power-down request")
        forced = not wait_gone(pid, timeout)
        if forced:
            end_process(pid, 0)
        return forced

    def force_off(self, name: str, files: GuestFiles, pid: int) -> None:
        end_process(pid, 0)

    def set_cpu_live(self, spec: GuestSpec) -> None:
        raise AgentError(
            ErrorCode.UNSUPPORTED,
            "live CPU limits need the guest to run as a systemd unit; this node has no systemd manager",
        )

    def describe(self, name: str, pid: int) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class SystemdSupervisor:
    """Each guest a transient unit of the agent user's systemd manager."""

    manager: UserManager
    # How a unit's ExecStop runs this agent again (its config and state dir included).
    agent_command: tuple[str, ...]
    name: str = "systemd"

    def start(self, spec: GuestSpec, argv: list[str], files: GuestFiles) -> None:
        stop_command = [*self.agent_command, "powerdown-guest", spec.name]
        start_unit(self.manager, spec, argv, files.pid_file, stop_command)

    def stop(self, name: str, files: GuestFiles, pid: int, timeout: float) -> bool:
        # Through systemd, so a restart policy never brings back a guest an operator stopped.
        files.stop_timeout.write_text(f"{timeout}\n")
        files.last_stop.unlink(missing_ok=True)
        stop_unit(self.manager, name)
        # No word from ExecStop means it never ran (the unit was still starting, say):
        # systemd's SIGTERM ended QEMU, which is a forced stop.
        return not (files.last_stop.exists() and files.last_stop.read_text().strip() == "clean")

    def force_off(self, name: str, files: GuestFiles, pid: int) -> None:
        files.stop_timeout.write_text("0\n")
        stop_unit(self.manager, name)

    def set_cpu_live(self, spec: GuestSpec) -> None:
        set_cpu_live(self.manager, spec)

    def describe(self, name: str, pid: int) -> dict[str, Any]:
        return {"unit": unit_name(name), "cgroup": cgroup_limits(pid)}
