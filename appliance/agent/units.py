"""Guests as systemd units, on a node whose PID 1 is systemd.

The agent runs as an unprivileged user, so guests are transient units of that
user's own systemd manager (kept running from boot by lingering): systemd then
owns restart-on-crash, the cgroup limits (user@.service delegates the cpu,
memory and pids controllers) and, at host shutdown, stopping each guest
through its ExecStop, which asks the guest to power down first.
Transient units do not survive a reboot; the appliance-guests user unit runs
`appliance-agent autostart` at boot for the guests marked autostart.

systemctl talks to the user manager over $XDG_RUNTIME_DIR/systemd/private,
so neither a D-Bus session bus nor a login session is needed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.errors import AgentError
from appliance.agent.model import GuestSpec, RestartPolicy
from appliance.agent.tools import run_tool

UNIT_PREFIX = "appliance-guest-"
RESTART_SECONDS = 2
# QEMU's own memory on top of the guest's: device emulation, TCG's code cache.
MEMORY_OVERHEAD_MIB = 256


@dataclass(frozen=True)
class UserManager:
    runtime_dir: Path

    def run(self, *args: str) -> str:
        """systemctl or systemd-run against this manager; failures become agent errors."""
        return run_tool(list(args), env={**os.environ, "XDG_RUNTIME_DIR": str(self.runtime_dir)})


def find_user_manager(systemd_dir: Path = Path("/run/systemd/system")) -> UserManager | None:
    """This user's systemd manager, when PID 1 is systemd and the manager is up."""
    if not systemd_dir.is_dir():
        return None
    runtime_dir = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")
    if not (runtime_dir / "systemd" / "private").exists():
        return None
    return UserManager(runtime_dir)


def unit_name(guest: str) -> str:
    # Guest names are already limited to [A-Za-z0-9_.-], all valid in unit names.
    return f"{UNIT_PREFIX}{guest}.service"


RESTART_SETTING = {RestartPolicy.NEVER: "no", RestartPolicy.ON_FAILURE: "on-failure", RestartPolicy.ALWAYS: "always"}


def cpu_properties(spec: GuestSpec) -> list[str]:
    quota = f"{spec.cpu_quota_percent}%" if spec.cpu_quota_percent else ""
    return [f"CPUWeight={spec.cpu_weight}", f"CPUQuota={quota}"]


def start_unit(
    manager: UserManager, spec: GuestSpec, qemu_argv: list[str], pid_file: Path, stop_command: list[str]
) -> None:
    """Run QEMU (which daemonizes, as without systemd) as the guest's transient unit."""
    unit = unit_name(spec.name)
    # A unit that failed earlier stays loaded and would block the name.
    with contextlib.suppress(AgentError):  # Not loaded: nothing to reset.
        manager.run("systemctl", "--user", "reset-failed", unit)
    properties = [
        "Type=forking",
        f"PIDFile={pid_file}",
        f"Restart={RESTART_SETTING[spec.restart]}",
        f"RestartSec={RESTART_SECONDS}",
        f"ExecStop={' '.join(stop_command)}",
        # ExecStop waits at most the guest's stop timeout (up to an hour).
        "TimeoutStopSec=3700",
        f"MemoryMax={(spec.memory_mib + MEMORY_OVERHEAD_MIB)}M",
        *cpu_properties(spec),
    ]
    argv = ["systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
            f"--description=appliance guest {spec.name}"]  # fmt: skip
    for prop in properties:
        argv.append(f"--property={prop}")
    manager.run(*argv, "--", *qemu_argv)


def stop_unit(manager: UserManager, guest: str) -> None:
    """Stop the unit: its ExecStop asks the guest first; systemd never restarts a stopped unit."""
    manager.run("systemctl", "--user", "stop", unit_name(guest))


def set_cpu_live(manager: UserManager, spec: GuestSpec) -> None:
    manager.run("systemctl", "--user", "set-property", "--runtime", unit_name(spec.name), *cpu_properties(spec))


def cgroup_of(pid: int) -> Path | None:
    """The cgroup v2 directory a process is in."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def cgroup_limits(pid: int) -> dict[str, str]:
    """What the kernel enforces on the guest's cgroup (not what was asked for)."""
    directory = cgroup_of(pid)
    limits: dict[str, str] = {}
    if directory is None:
        return limits
    limits["path"] = str(directory)
    for name in ("cpu.max", "cpu.weight", "memory.max"):
        try:
            limits[name] = (directory / name).read_text().strip()
        except OSError:
            continue
    return limits
