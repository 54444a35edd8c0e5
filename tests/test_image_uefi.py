"""The same ISO boots under UEFI firmware (OVMF) too (slow).

A module of its own: it runs after test_image.py has stopped its BIOS-booted
node, since both use the build directory's run/ files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.render import READY_MARKER

pytestmark = pytest.mark.slow


def test_iso_boots_to_the_ready_marker_under_uefi(built_appliance: Path) -> None:
    boot = [sys.executable, "-m", "appliance.cli", "boot", str(built_appliance), "--wait", "--uefi", "--timeout", "900"]
    try:
        result = subprocess.run(boot, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        console = (built_appliance / "run" / "serial.log").read_text(errors="replace")
        assert READY_MARKER in console
        # OVMF announces itself on the serial console; SeaBIOS never does.
        assert "BdsDxe" in console or "UEFI" in console, console[:2000]
    finally:
        subprocess.run([sys.executable, "-m", "appliance.cli", "stop", str(built_appliance)], check=False)
