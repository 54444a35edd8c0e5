"""The node itself, as operators act on it: reboot, power off, read its journal.

The agent runs unprivileged; a sudoers rule (the appliance-agent element)
lets it run exactly `systemctl reboot` and `systemctl poweroff` as root, and
its group systemd-journal lets it read the journal. Off an appliance (no
systemd as PID 1) these are refused as unsupported.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.tools import run_tool

SYSTEMD_DIR = Path("/run/systemd/system")
MAX_LOG_LINES = 10_000
POWER_ACTIONS = {"reboot": "reboot", "shutdown": "poweroff"}


def require_systemd(systemd_dir: Path = SYSTEMD_DIR) -> None:
    if not systemd_dir.is_dir():
        raise AgentError(
            ErrorCode.UNSUPPORTED, "this node's PID 1 is not systemd: it has no reboot, power-off or journal"
        )


def power(action: str, systemd_dir: Path = SYSTEMD_DIR) -> dict[str, Any]:
    """Ask systemd to reboot or power off; the answer goes out before the connection drops.

    Started with --no-block in the background: systemd stops the guests (each
    unit's ExecStop powers its guest down), then the node goes.
    """
    require_systemd(systemd_dir)
    subprocess.Popen(
        ["sudo", "--non-interactive", "systemctl", "--no-block", POWER_ACTIONS[action]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return {"action": action, "accepted": True}


def journal(lines: int, unit: str, boot: int, systemd_dir: Path = SYSTEMD_DIR) -> dict[str, Any]:
    """The last `lines` of the journal, of one unit when given, of this boot (0) or an earlier one (-1, ...)."""
    require_systemd(systemd_dir)
    argv = ["journalctl", "--no-pager", "--output=short-iso", f"--lines={lines}", f"--boot={boot}"]
    if unit:
        argv.append(f"--unit={unit}")
    return {"lines": run_tool(argv).splitlines()}
