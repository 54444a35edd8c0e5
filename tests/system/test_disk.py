"""The disk image flashed to a file and booted under OVMF (slow).

The flashed file is the image byte for byte (flash reads it back against the
manifest's sha256). A second disk carries the same image as another build
would have made it (same labels, its own partition UUIDs and ESP serial): the
node must boot and keep its state on its own disk, never on that one.

The SeaBIOS boot from a copy-on-write overlay, the reboot that keeps the host
key and the state, and the data partition grown to fill the disk are checked
by test_e2e.py (`appliance selftest`): one boot here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.disk_files import gpt_partitions, qcow2_as_raw

from appliance.build.pack.disk import DATA_LABEL, ESP_LABEL
from appliance.build.render import READY_MARKER

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


def partitions(disk: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """A disk file's GPT partitions by name."""
    return {part["name"]: part for part in gpt_partitions(disk)}


def as_another_build(raw: Path, decoy: Path) -> None:
    """RAW as another build of the same spec would be: new partition UUIDs and ESP serial."""
    copy = decoy.with_suffix(".raw")
    subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
    for number, _ in enumerate(partitions(copy), start=1):
        subprocess.run(["sfdisk", "--quiet", "--part-uuid", str(copy), str(number), str(uuid.uuid4())], check=True)
    esp = partitions(copy)["esp"]["start"] * 512
    subprocess.run(["mlabel", "-i", f"{copy}@@{esp}", "-N", "0DDC0FFE", f"::{ESP_LABEL}"],
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=True)  # fmt: skip
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(copy), str(decoy)], check=True)
    copy.unlink()


def data_partition_size(qcow2: Path, scratch: Path) -> int:
    raw = qcow2_as_raw(qcow2, scratch / f"{qcow2.stem}.raw")
    return int(partitions(raw)[DATA_LABEL]["size"]) * 512


def test_disk_flashed_to_a_file_boots_under_uefi(built_appliance: Path, tmp_path: Path) -> None:
    # The flashed file, in a build directory of its own so that `appliance boot` takes it.
    flashed = tmp_path / "flashed"
    flashed.mkdir()
    raw = raw_artifact(built_appliance)
    result = appliance("flash", str(built_appliance), str(flashed / raw["file"]), "--yes")
    assert result.returncode == 0, result.stderr
    assert "matches the manifest" in result.stdout
    (flashed / "manifest.json").write_text((built_appliance / "manifest.json").read_text())
    # The runner keeps an extra disk it finds in run/: this one is not blank.
    decoy = flashed / "run" / "extra-disk.qcow2"
    decoy.parent.mkdir()
    as_another_build(flashed / raw["file"], decoy)
    decoy_data = data_partition_size(decoy, tmp_path)
    try:
        boot_disk(flashed, "--uefi", "--extra-disk", "2")
        text = console(flashed)
        assert READY_MARKER in text and "root slot a on" in text
        # OVMF announces itself on the serial console; SeaBIOS never does.
        assert "BdsDxe" in text or "UEFI" in text, text[:2000]
    finally:
        appliance("stop", str(flashed))
    # The node grew the data partition of the disk it booted from (its overlay), not the other's.
    assert data_partition_size(flashed / "run" / "disk.qcow2", tmp_path) > 2 << 30
    assert data_partition_size(decoy, tmp_path) == decoy_data
