"""The disk image flashed to a file and booted under OVMF (slow).

The flashed file is the image byte for byte (flash reads it back against the
manifest's sha256). The SeaBIOS boot from a copy-on-write overlay, the reboot
that keeps the host key and the state, and the data partition grown to fill
the disk are checked by test_e2e.py (`appliance selftest`): one boot here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.render import READY_MARKER

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False)


def boot_disk(out_dir: Path, *options: str) -> str:
    result = appliance("boot", str(out_dir), "--media", "disk", "--wait", "--timeout", str(BOOT_TIMEOUT), *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready after" in result.stdout
    return result.stdout


def console(out_dir: Path) -> str:
    return (out_dir / "run" / "serial.log").read_text(errors="replace")


def raw_artifact(out_dir: Path) -> dict:  # type: ignore[type-arg]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    (raw,) = [artifact for artifact in manifest["artifacts"] if artifact["file"].endswith(".raw")]
    return raw


def test_disk_flashed_to_a_file_boots_under_uefi(built_appliance: Path, tmp_path: Path) -> None:
    # The flashed file, in a build directory of its own so that `appliance boot` takes it.
    flashed = tmp_path / "flashed"
    flashed.mkdir()
    raw = raw_artifact(built_appliance)
    result = appliance("flash", str(built_appliance), str(flashed / raw["file"]), "--yes")
    assert result.returncode == 0, result.stderr
    assert "matches the manifest" in result.stdout
    (flashed / "manifest.json").write_text((built_appliance / "manifest.json").read_text())
    try:
        boot_disk(flashed, "--uefi")
        text = console(flashed)
        assert READY_MARKER in text and "root slot a on" in text
        # OVMF announces itself on the serial console; SeaBIOS never does.
        assert "BdsDxe" in text or "UEFI" in text, text[:2000]
    finally:
        appliance("stop", str(flashed))
