"""Running `python -m appliance.cli` as an operator would, in a HOME of the test's own.

The engineer's own ~/.ssh, ssh-agent and APPLIANCE_SSH_* variables never
reach the command: HOME is the test's, SSH_AUTH_SOCK and the variables are
dropped unless the test gives them, and stdin is not a terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DROPPED = ("SSH_AUTH_SOCK", "APPLIANCE_SSH_KEY", "APPLIANCE_SSH_PASSPHRASE")


def cli_environment(home: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if name not in DROPPED}
    environment["HOME"] = str(home)
    environment.update(env or {})
    return environment


def run_cli(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env=cli_environment(home, env),
        timeout=timeout,
    )
