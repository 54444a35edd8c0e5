"""The disk image booted in QEMU from a copy-on-write overlay: under OVMF, and flashed to a file (slow).

The SeaBIOS boot, the reboot that keeps the host key and the state, and the
data partition grown to fill the disk are checked by test_e2e.py (`appliance selftest`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.pack.manifest import sha256_of
from appliance.render import READY_MARKER

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def stopped_after(built_appliance: Path) -> Iterator[Path]:
    try:
        yield built_appliance
    finally:
        appliance("stop", str(built_appliance))


def boot_disk(out_dir: Path, *options: str) -> str:
    result = appliance("boot", str(out_dir), "--media", "disk", "--wait", "--timeout", str(BOOT_TIMEOUT), *options)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def console(out_dir: Path) -> str:
    return (out_dir / "run" / "serial.log").read_text(errors="replace")


def test_disk_boots_to_the_ready_marker_under_uefi(stopped_after: Path) -> None:
    output = boot_disk(stopped_after, "--fresh-disk", "--uefi")
    assert "ready after" in output
    text = console(stopped_after)
    assert READY_MARKER in text and "root slot a on" in text
    # OVMF announces itself on the serial console; SeaBIOS never does.
    assert "BdsDxe" in text or "UEFI" in text, text[:2000]
    # The artifact itself stays pristine: the node wrote into the overlay only.
    manifest = json.loads((stopped_after / "manifest.json").read_text())
    (raw,) = [artifact for artifact in manifest["artifacts"] if artifact["file"].endswith(".raw")]
    assert sha256_of(stopped_after / raw["file"]) == raw["sha256"]


def test_a_disk_flashed_to_a_file_boots(built_appliance: Path, tmp_path: Path) -> None:
    # The flashed file, set up as a build directory of its own so `appliance boot` takes it.
    flashed = tmp_path / "flashed"
    flashed.mkdir()
    manifest = json.loads((built_appliance / "manifest.json").read_text())
    (raw,) = [artifact["file"] for artifact in manifest["artifacts"] if artifact["file"].endswith(".raw")]
    result = appliance("flash", str(built_appliance), str(flashed / raw), "--yes")
    assert result.returncode == 0, result.stderr
    assert "matches the manifest" in result.stdout
    (flashed / "manifest.json").write_text(json.dumps(manifest))
    try:
        boot_disk(flashed)
        assert READY_MARKER in console(flashed)
    finally:
        appliance("stop", str(flashed))
