"""The same ISO boots under UEFI firmware (OVMF) too, and claims a blank disk (slow).

A module of its own: it runs after test_image.py has stopped its BIOS-booted
node, since both use the build directory's run/ files. The test build has
[storage] claim_blank_disk = true (conftest.py); test_image.py's boot has no
disk and keeps its state in RAM, this one is given a blank disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.disk_files import gpt_partitions, probe_partition, qcow2_as_raw

from appliance.build.pack.disk import DATA_LABEL, DATA_TYPE
from appliance.build.render import READY_MARKER
from appliance.nodes.client import Node, NodeAddress

pytestmark = pytest.mark.slow


def test_iso_boots_under_uefi_and_claims_the_blank_disk(
    built_appliance: Path, operator_key: Path, tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "appliance.cli"]
    boot = [*cli, "boot", str(built_appliance), "--wait", "--uefi", "--timeout", "900", "--extra-disk", "2"]
    run_dir = built_appliance / "run"
    try:
        result = subprocess.run([*boot, "--fresh-disk"], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        console = (run_dir / "serial.log").read_text(errors="replace")
        assert READY_MARKER in console
        # OVMF announces itself on the serial console; SeaBIOS never does.
        assert "BdsDxe" in console or "UEFI" in console, console[:2000]
        assert "appliance: claiming blank disk /dev/vd" in console, console[-3000:]
        address = NodeAddress("127.0.0.1", int((run_dir / "ssh-port").read_text()), "appliance")
        with Node(address, operator_key, known_hosts=tmp_path / "known_hosts", timeout=120) as client:
            report = client.call("host.report")
        assert report["state_storage"] == "persistent"
        # The ISO is on the IDE CD drive: the claimed disk is the only virtio one.
        assert report["state_device"] == "/dev/vda1"
    finally:
        subprocess.run([*cli, "stop", str(built_appliance)], check=False)
    # What the node wrote on the disk QEMU gave it, read from a raw copy.
    raw = qcow2_as_raw(run_dir / "extra-disk.qcow2", tmp_path / "extra.raw")
    (partition,) = gpt_partitions(raw)
    assert partition["name"] == DATA_LABEL and partition["type"] == DATA_TYPE.upper()
    probe = probe_partition(raw, partition)
    assert f"LABEL={DATA_LABEL}" in probe and "TYPE=ext4" in probe
