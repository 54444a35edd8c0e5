from __future__ import annotations

import subprocess
import time
from pathlib import Path

from appliance.qemu import (
    PROBE_BOOT_SECTOR,
    PROBE_MARKER,
    QEMU,
    AccelChoice,
    BootConfig,
    VmPaths,
    probe_accel,
    qemu_argv,
)


def test_probe_boot_sector_prints_its_marker_under_tcg(tmp_path: Path) -> None:
    """The KVM probe is only as good as its guest: it must really print under QEMU."""
    assert len(PROBE_BOOT_SECTOR) == 512 and PROBE_BOOT_SECTOR.endswith(b"\x55\xaa")
    disk, serial = tmp_path / "probe.img", tmp_path / "serial.log"
    disk.write_bytes(PROBE_BOOT_SECTOR)
    process = subprocess.Popen(
        [
            QEMU,
            "-accel",
            "tcg",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-drive",
            f"file={disk},format=raw,if=floppy",
            "-serial",
            f"file:{serial}",
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (serial.exists() and PROBE_MARKER in serial.read_bytes()):
            assert process.poll() is None, "QEMU exited before the probe printed"
            time.sleep(0.05)
        assert PROBE_MARKER in serial.read_bytes()
    finally:
        process.kill()
        process.wait()


def test_probe_without_kvm_device_chooses_tcg_and_says_why(tmp_path: Path) -> None:
    choice = probe_accel(kvm_device=tmp_path / "no-kvm")
    assert choice.accel == "tcg"
    assert "no-kvm" in choice.reason


def test_probe_gives_a_definite_answer_on_this_machine() -> None:
    choice = probe_accel()
    assert choice.accel in ("kvm", "tcg") and choice.reason
    assert choice.cpu == ("host" if choice.accel == "kvm" else "max")


def test_qemu_argv_boots_the_iso_with_ssh_forwarded(tmp_path: Path) -> None:
    config = BootConfig(iso=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, memory_mb=1024, cpus=1)
    argv = qemu_argv(config, VmPaths(tmp_path / "run"))
    joined = " ".join(argv)
    assert "q35,accel=tcg" in joined and "-cpu max" in joined
    assert f"file={tmp_path / 'a.iso'},media=cdrom" in joined
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"file:{tmp_path / 'run' / 'serial.log'}" in joined
    assert "pflash" not in joined


def test_uefi_boot_uses_a_private_copy_of_the_ovmf_variables(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "run")
    paths.run_dir.mkdir()
    config = BootConfig(iso=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, firmware="uefi")
    joined = " ".join(qemu_argv(config, paths))
    assert "if=pflash" in joined and "readonly=on" in joined
    assert (paths.run_dir / "OVMF_VARS.fd").exists()
