"""The disk image booted in QEMU (slow): under SeaBIOS from a copy-on-write overlay, twice, keeping
its state across the reboot; and flashed to a file, under OVMF.

Three boots cover both firmwares, the reboot and the flash: the flashed file is
the image byte for byte (flash reads it back against the manifest's sha256).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from appliance.client import Node, NodeAddress, fingerprint
from appliance.pack.manifest import sha256_of
from appliance.render import READY_MARKER

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900
GIB = 1 << 30
DISK_GIB = 4


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


@dataclass(frozen=True)
class NodeFacts:
    host_key: str
    storage_total_bytes: int
    images: tuple[str, ...]


def node_facts(out_dir: Path, key: Path, known_hosts: Path, push: Path | None = None) -> NodeFacts:
    """What the node presents over SSH: its host key, its state directory's size, its images."""
    port = int((out_dir / "run" / "ssh-port").read_text())
    with Node(NodeAddress("127.0.0.1", port), key, known_hosts=known_hosts, timeout=120) as node:
        if push is not None:
            node.push_image(push, push.name)
        report = node.call("host.report")
        images = node.call("image.list")
    (recorded,) = paramiko.HostKeys(str(known_hosts)).values()
    (host_key,) = recorded.values()
    return NodeFacts(
        host_key=fingerprint(host_key),
        storage_total_bytes=int(report["storage_total_bytes"]),
        images=tuple(sorted(str(image["name"]) for image in images)),
    )


def test_disk_boots_under_seabios_and_keeps_host_key_and_state_across_a_reboot(
    built_appliance: Path, operator_key: Path, tmp_path: Path
) -> None:
    out_dir = built_appliance
    image = tmp_path / "tiny.raw"
    image.write_bytes(b"\0" * (1 << 20))
    try:
        output = boot_disk(out_dir, "--fresh-disk", "--disk-size", str(DISK_GIB))
        assert "new 4.0 GiB overlay" in output
        text = console(out_dir)
        assert READY_MARKER in text
        # GRUB's menu entry says which root slot it found; OVMF would have announced itself.
        assert "root slot a on" in text and "BdsDxe" not in text
        assert "appliance: state on /dev/" in text
        first = node_facts(out_dir, operator_key, tmp_path / "first_known_hosts", push=image)
        # The 64 MiB data partition took the rest of the 4 GiB disk (all but the ~0.7 GiB before it).
        assert first.storage_total_bytes > 3 * GIB, first

        appliance("stop", str(out_dir))
        output = boot_disk(out_dir, "--disk-size", str(DISK_GIB))
        assert "from an earlier boot" in output
        second = node_facts(out_dir, operator_key, tmp_path / "second_known_hosts")
        assert second.host_key == first.host_key
        assert second.images == first.images and "tiny.raw" in second.images
        assert second.storage_total_bytes == first.storage_total_bytes
    finally:
        appliance("stop", str(out_dir))
    # The artifact itself stays pristine: the node wrote into the overlay only.
    raw = raw_artifact(out_dir)
    assert sha256_of(out_dir / raw["file"]) == raw["sha256"]


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
