"""boot.py's disk overlay: made over NAME.raw, kept from boot to boot, replaced when the build changes."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.waiting import wait_until

from appliance.agent.accel import AccelChoice, boot_sector_printing
from appliance.boot.boot import (
    GIB,
    BootRequest,
    boot,
    choose_ssh_port,
    prepare_disk,
    prepare_extra_disk,
    start_and_wait,
)
from appliance.boot.vm import BootConfig, KernelPanicError, QemuError, VmPaths, free_local_port, recorded_vm
from appliance.manifest import Manifest, MissingArtifactError


def write_build(out_dir: Path, build_id: str, outputs: tuple[str, ...] = ("appliance.raw",)) -> Manifest:
    out_dir.mkdir(exist_ok=True)
    (out_dir / "appliance.raw").write_bytes(b"\0" * 1024 * 1024)
    manifest = {"build_id": build_id, "artifacts": [{"file": name} for name in outputs]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return Manifest.load(out_dir)


def request(out_dir: Path, **changes: object) -> BootRequest:
    fields: dict[str, object] = {
        "out_dir": out_dir, "wait": True, "timeout": 1.0, "accel": "tcg", "firmware": "bios",
        "memory_mb": 512, "cpus": 1, "media": "disk", "disk_gib": 2,
    }  # fmt: skip
    fields.update(changes)
    return BootRequest(**fields)  # type: ignore[arg-type]


def virtual_size(image: Path) -> int:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    return int(info["virtual-size"])


def test_a_new_disk_is_an_overlay_over_the_raw_image_of_the_asked_size(tmp_path: Path) -> None:
    manifest = write_build(tmp_path, "b1")
    paths = VmPaths(tmp_path / "run")
    say = io.StringIO()
    overlay = prepare_disk(request(tmp_path), manifest, paths, say)
    assert overlay == paths.disk_overlay and virtual_size(overlay) == 2 * GIB
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    # Named relative to the overlay, so a copy of the directory boots its own image.
    assert info["backing-filename"] == "../appliance.raw"
    assert Path(info["full-backing-filename"]).resolve() == (tmp_path / "appliance.raw").resolve()
    assert "new 2.0 GiB overlay" in say.getvalue()


def test_the_disk_is_kept_across_boots_of_the_same_build(tmp_path: Path) -> None:
    manifest = write_build(tmp_path, "b1")
    paths = VmPaths(tmp_path / "run")
    overlay = prepare_disk(request(tmp_path), manifest, paths, io.StringIO())
    overlay.write_bytes(overlay.read_bytes())  # the node wrote to it
    stamp = overlay.stat().st_mtime_ns
    say = io.StringIO()
    assert prepare_disk(request(tmp_path), manifest, paths, say) == overlay
    assert overlay.stat().st_mtime_ns == stamp and "from an earlier boot" in say.getvalue()


def test_a_new_build_or_fresh_disk_starts_over(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "run")
    prepare_disk(request(tmp_path), write_build(tmp_path, "b1"), paths, io.StringIO())
    say = io.StringIO()
    prepare_disk(request(tmp_path, disk_gib=3), write_build(tmp_path, "b2"), paths, say)
    assert "made over build b1" in say.getvalue() and virtual_size(paths.disk_overlay) == 3 * GIB
    say = io.StringIO()
    prepare_disk(request(tmp_path, fresh_disk=True), write_build(tmp_path, "b2"), paths, say)
    assert "new" in say.getvalue() and "earlier boot" not in say.getvalue()


def test_the_extra_disk_is_blank_when_made_then_kept_until_fresh_disk(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "run")
    assert prepare_extra_disk(request(tmp_path), paths, io.StringIO()) is None
    extra = prepare_extra_disk(request(tmp_path, extra_disk_gib=3), paths, io.StringIO())
    assert extra == paths.extra_disk and virtual_size(extra) == 3 * GIB
    # Blank: the node sees nothing on it, as on a new server's disk.
    info = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(extra)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert all(not extent["data"] for extent in info)
    extra.write_bytes(extra.read_bytes())  # the node wrote to it
    stamp = extra.stat().st_mtime_ns
    say = io.StringIO()
    assert prepare_extra_disk(request(tmp_path, extra_disk_gib=3), paths, say) == extra
    assert extra.stat().st_mtime_ns == stamp and "from an earlier boot" in say.getvalue()
    say = io.StringIO()
    prepare_extra_disk(request(tmp_path, extra_disk_gib=3, fresh_disk=True), paths, say)
    assert "new blank 3 GiB" in say.getvalue()


def test_a_build_without_a_disk_says_which_output_to_add(tmp_path: Path) -> None:
    manifest = write_build(tmp_path, "b1", outputs=("appliance.iso",))
    with pytest.raises(MissingArtifactError, match='add "disk" to outputs'):
        prepare_disk(request(tmp_path), manifest, VmPaths(tmp_path / "run"), io.StringIO())


def test_a_second_boot_from_the_same_directory_is_refused(tmp_path: Path) -> None:
    write_build(tmp_path, "b1")
    paths = VmPaths(tmp_path / "run")
    paths.directory.mkdir()
    # Stands in for the QEMU of an earlier `boot --wait`: its command line names QEMU and the pid file.
    stand_in = subprocess.Popen(
        ["bash", "-c", f'exec -a "qemu-system-x86_64 -pidfile {paths.pid_file}" sleep 60'], start_new_session=True
    )
    try:
        # Until it has exec'd, the child's command line is still this test process's.
        wait_until(
            lambda: b"qemu-system-x86_64" in Path(f"/proc/{stand_in.pid}/cmdline").read_bytes(),
            30,
            "the stand-in to exec",
        )
        paths.pid_file.write_text(f"{stand_in.pid}\n")
        with pytest.raises(QemuError, match="already running"):
            boot(request(tmp_path, fresh_disk=True), io.StringIO())
        assert not paths.disk_overlay.exists()
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_kernel_panic_before_ready_fails_at_once_and_is_booted_once_more_under_tcg(tmp_path: Path) -> None:
    # A boot sector that prints what a panicking kernel prints, then halts.
    sector = boot_sector_printing(b"Kernel panic - not syncing: stand-in\r\n")
    raw = tmp_path / "panic.raw"
    raw.write_bytes(sector.ljust(1 << 20, b"\0"))
    disk = tmp_path / "panic.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    paths = VmPaths(tmp_path / "run")
    config = BootConfig(media=disk, accel=AccelChoice("tcg", "test"), ssh_port=free_local_port(),
                        memory_mb=64, cpus=1, media_kind="disk")  # fmt: skip
    say = io.StringIO()
    with pytest.raises(KernelPanicError, match="stand-in"):
        start_and_wait(request(tmp_path, timeout=120.0), config, paths, say, "appliance")
    assert "booting once more" in say.getvalue() and say.getvalue().count("QEMU pid") == 2
    assert b"stand-in" in (paths.directory / "serial-panic.log").read_bytes()
    assert recorded_vm(paths) is None  # both QEMUs stopped


def backing_of(overlay: Path) -> Path:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    return Path(info["full-backing-filename"]).resolve()


def test_a_copied_build_directory_boots_its_own_image(tmp_path: Path) -> None:
    original, copy = tmp_path / "out", tmp_path / "copy"
    manifest = write_build(original, "b1")
    prepare_disk(request(original), manifest, VmPaths(original / "run"), io.StringIO())
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # deleting (or rebuilding) the original leaves the copy whole
    say = io.StringIO()
    overlay = prepare_disk(request(copy), Manifest.load(copy), VmPaths(copy / "run"), say)
    assert "from an earlier boot" in say.getvalue()
    assert backing_of(overlay) == (copy / "appliance.raw").resolve()


def test_an_overlay_over_another_directorys_image_is_replaced_saying_why(tmp_path: Path) -> None:
    original, copy = tmp_path / "out", tmp_path / "copy"
    write_build(original, "b1")
    shutil.copytree(original, copy)
    # As overlays were made before: the backing file by its absolute path, here the original's.
    (copy / "run").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(original / "appliance.raw"),
                    str(copy / "run" / "disk.qcow2"), str(2 * GIB)], check=True)  # fmt: skip
    (copy / "run" / "disk.build-id").write_text("b1\n")
    say = io.StringIO()
    overlay = prepare_disk(request(copy), Manifest.load(copy), VmPaths(copy / "run"), say)
    assert f"is over {(original / 'appliance.raw').resolve()}, not this directory's appliance.raw" in say.getvalue()
    assert "making a new one" in say.getvalue() and backing_of(overlay) == (copy / "appliance.raw").resolve()


def test_an_old_overlay_naming_its_own_image_absolutely_is_kept_and_renamed_relative(tmp_path: Path) -> None:
    manifest = write_build(tmp_path, "b1")
    overlay = tmp_path / "run" / "disk.qcow2"
    overlay.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(tmp_path / "appliance.raw"),
                    str(overlay), str(2 * GIB)], check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(overlay)], check=True, capture_output=True)
    (tmp_path / "run" / "disk.build-id").write_text("b1\n")
    say = io.StringIO()
    assert prepare_disk(request(tmp_path), manifest, VmPaths(tmp_path / "run"), say) == overlay
    assert "from an earlier boot" in say.getvalue()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert info["backing-filename"] == "../appliance.raw"
    # The node's data is still there.
    check = subprocess.run(["qemu-io", "-c", "read -P 0x5a 0 64k", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout


def test_the_ssh_port_is_the_one_asked_for_else_the_last_boots_while_free(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "run")
    paths.directory.mkdir()
    first = choose_ssh_port(None, paths, io.StringIO())
    paths.ssh_port_file.write_text(f"{first}\n")  # as start_vm records it
    say = io.StringIO()
    assert choose_ssh_port(None, paths, say) == first and f"port {first}, as at the last boot" in say.getvalue()
    with socket.create_server(("127.0.0.1", first)):
        say = io.StringIO()
        other = choose_ssh_port(None, paths, say)
        assert other != first and f"port {first} of the last boot is in use; port {other} now" in say.getvalue()
        with pytest.raises(QemuError, match=f"--ssh-port {first}: 127.0.0.1:{first} is in use"):
            choose_ssh_port(first, paths, io.StringIO())
    assert choose_ssh_port(other, paths, io.StringIO()) == other


def test_boot_takes_ssh_port_on_the_command_line(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "appliance.cli", "boot", "--help"], capture_output=True, text=True)
    assert "--ssh-port PORT" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "appliance.cli", "boot", str(tmp_path), "--ssh-port", "70000"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "'70000' is not a TCP port (1-65535)" in bad.stderr


def test_boot_takes_a_lan_port_on_the_command_line(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "appliance.cli", "boot", "--help"], capture_output=True, text=True)
    assert "--lan PORT" in helped.stdout and "appliance boot node2 --wait --lan 40400" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "appliance.cli", "boot", str(tmp_path), "--lan", "0"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "'0' is not a UDP port (1-65535)" in bad.stderr
