"""The PXE set boots in QEMU (slow): QEMU's TFTP hands iPXE the chain script, HTTP on loopback the rest.

A module of its own, after the ISO and disk boots: all use the build directory's run/ files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.build.render import READY_MARKER

pytestmark = pytest.mark.slow


def test_pxe_set_boots_to_the_ready_marker(built_appliance: Path) -> None:
    boot = [sys.executable, "-m", "appliance.cli", "boot", str(built_appliance), "--media", "pxe", "--wait",
            "--timeout", "900"]  # fmt: skip
    try:
        result = subprocess.run(boot, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "pxe: serving" in result.stdout and "ready after" in result.stdout
        console = (built_appliance / "run" / "serial.log").read_text(errors="replace")
        assert READY_MARKER in console
        # DHCP named the TFTP boot file, and live-boot fetched the root over HTTP.
        assert "filename  : boot.ipxe" in console, console[:3000]
        assert "saving to '/run/live/medium/live/appliance.squashfs'" in console, console[:3000]
    finally:
        subprocess.run([sys.executable, "-m", "appliance.cli", "stop", str(built_appliance)], check=False)
