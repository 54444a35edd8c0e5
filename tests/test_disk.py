"""The disk image booted in QEMU from a copy-on-write overlay: SeaBIOS, OVMF, and a reboot (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
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


def test_disk_boots_to_the_ready_marker_under_seabios(stopped_after: Path) -> None:
    output = boot_disk(stopped_after, "--fresh-disk")
    assert "ready after" in output and "new" in output
    text = console(stopped_after)
    assert READY_MARKER in text
    # GRUB's menu entry says which root slot it found.
    assert "root slot a on" in text
    assert "BdsDxe" not in text


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


def test_the_node_keeps_its_host_key_and_state_across_a_reboot_on_a_grown_disk(
    stopped_after: Path, operator_key: Path, tmp_path: Path
) -> None:
    image = tmp_path / "tiny.raw"
    image.write_bytes(b"\0" * (1 << 20))
    boot_disk(stopped_after, "--fresh-disk", "--disk-size", str(DISK_GIB))
    first = node_facts(stopped_after, operator_key, tmp_path / "first_known_hosts", push=image)
    assert "state on /dev/" in console(stopped_after)
    # The 64 MiB data partition took the rest of the 4 GiB disk (all but the ~0.7 GiB before it).
    assert first.storage_total_bytes > 3 * GIB, first

    appliance("stop", str(stopped_after))
    output = boot_disk(stopped_after, "--disk-size", str(DISK_GIB))
    assert "from an earlier boot" in output
    second = node_facts(stopped_after, operator_key, tmp_path / "second_known_hosts")
    assert second.host_key == first.host_key
    assert second.images == first.images and "tiny.raw" in second.images
    assert second.storage_total_bytes == first.storage_total_bytes


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
