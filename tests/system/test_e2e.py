"""End to end, as a user meets it (slow): `appliance selftest` on the default build.

Boot from the disk image; over SSH the host report; a tiny guest image pushed;
an autostart guest started inside the node (QEMU TCG inside QEMU TCG) and its
console marker seen; a new agent finds it running; the node shut down and
booted again finds the guest running again, its definition kept, and the same
SSH host key. A module of its own: it uses the build directory's run/ files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.manifest import sha256_of

pytestmark = pytest.mark.slow


def test_selftest_passes_on_the_default_build(built_appliance: Path, operator_key: Path) -> None:
    command = [sys.executable, "-m", "appliance.cli", "selftest", str(built_appliance), "--key", str(operator_key)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for step in (
        "boot the disk image in QEMU to the ready marker",
        "take the host report",
        "push a tiny guest image",
        "see its console marker",
        "find the guest running, re-adopted",
        "boot it again from the same disk",
        "find the same host key and the autostart guest running with its definition",
    ):
        assert f"- {step}" in output or step in output, (step, output)
    assert "selftest passed: 7 steps" in output
    assert "guests run as systemd, state in persistent" in output
    # Booted from the disk under SeaBIOS: GRUB's menu entry names the root slot it found.
    console = (built_appliance / "run" / "serial.log").read_text(errors="replace")
    assert "root slot a on" in console and "BdsDxe" not in console
    assert "appliance: state on /dev/" in console
    # The artifact itself stays pristine: the node wrote into its overlay only.
    manifest = json.loads((built_appliance / "manifest.json").read_text())
    (raw,) = [artifact for artifact in manifest["artifacts"] if artifact["file"].endswith(".raw")]
    assert sha256_of(built_appliance / raw["file"]) == raw["sha256"]
