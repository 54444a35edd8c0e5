"""appliance flash against files: written, verified, refused when it must be."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.deploy.flash import FlashError, Target, check_target, describe_target, devices_in_use, flash

MIB = 1 << 20


def make_build(out_dir: Path, sha256: str | None = None) -> Path:
    """A build directory whose disk image has data at both ends and a hole between."""
    out_dir.mkdir(exist_ok=True)
    image = out_dir / "demo.raw"
    with image.open("wb") as stream:
        stream.write(b"GPT!" * 1024)
        stream.seek(9 * MIB - 4096)
        stream.write(b"END!" * 1024)
    data = image.read_bytes()
    artifact = {"file": image.name, "size_bytes": len(data), "sha256": sha256 or hashlib.sha256(data).hexdigest()}
    (out_dir / "manifest.json").write_text(json.dumps({"artifacts": [artifact]}))
    return image


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_flash_to_a_file_writes_the_image_and_reads_it_back(tmp_path: Path) -> None:
    image = make_build(tmp_path / "out")
    target = tmp_path / "stick.img"
    target.write_bytes(b"old" * (5 * MIB))  # longer than the image: nothing of it may remain
    seen: list[int] = []
    result = flash(tmp_path / "out", target, lambda question: True, lambda done, size: seen.append(done), used={})
    assert target.read_bytes() == image.read_bytes()
    assert result.size_bytes == 9 * MIB and seen[-1] == 9 * MIB
    # The hole in the image stays a hole in the file.
    assert os.stat(target).st_blocks * 512 < 9 * MIB


def test_nothing_is_written_unless_confirmed(tmp_path: Path) -> None:
    make_build(tmp_path / "out")
    target = tmp_path / "disk.img"
    questions: list[str] = []
    with pytest.raises(FlashError, match="not confirmed"):
        flash(tmp_path / "out", target, lambda q: questions.append(q) is not None, lambda d, s: None, used={})
    assert not target.exists()
    assert "demo.raw" in questions[0] and str(target) in questions[0]


def test_without_a_terminal_the_cli_refuses_unless_yes(tmp_path: Path) -> None:
    image = make_build(tmp_path / "out")
    target = tmp_path / "disk.img"
    refused = run_cli("flash", str(tmp_path / "out"), str(target))
    assert refused.returncode == 1 and "--yes" in refused.stderr and "Traceback" not in refused.stderr
    assert not target.exists()
    done = run_cli("flash", str(tmp_path / "out"), str(target), "--yes")
    assert done.returncode == 0, done.stderr
    assert "matches the manifest" in done.stdout and target.read_bytes() == image.read_bytes()


def test_an_image_that_changed_since_the_build_is_reported(tmp_path: Path) -> None:
    make_build(tmp_path / "out", sha256="0" * 64)
    with pytest.raises(FlashError, match="does not match its manifest"):
        flash(tmp_path / "out", tmp_path / "t.img", lambda q: True, lambda d, s: None, used={})


def test_a_build_without_a_disk_image_says_what_to_add(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": [{"file": "a.iso"}]}))
    result = run_cli("flash", str(tmp_path), str(tmp_path / "t.img"), "--yes")
    assert result.returncode == 1 and 'add "disk" to outputs' in result.stderr


def test_a_mounted_target_or_one_of_its_partitions_is_refused(tmp_path: Path) -> None:
    image = make_build(tmp_path / "out")
    disk = Target(Path("/dev/sdz"), block_device=True, devices=frozenset({(8, 240), (8, 241), (8, 242)}))
    with pytest.raises(FlashError, match=r"8:242 mounted on /var/lib/appliance-data"):
        check_target(disk, image, {(8, 242): "mounted on /var/lib/appliance-data", (8, 1): "mounted on /"})
    with pytest.raises(FlashError, match="used as swap"):
        check_target(disk, image, {(8, 240): "used as swap"})
    check_target(disk, image, {(8, 1): "mounted on /"})


def test_mountinfo_and_swaps_name_the_devices_in_use() -> None:
    mountinfo = (
        "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
        "30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n"
        "41 22 253:5 / /var/lib/appliance-data rw - ext4 /dev/vda5 rw\n"
    )
    used = devices_in_use(mountinfo, "Filename\tType\tSize\tUsed\tPriority\n")
    assert used[(8, 2)] == "mounted on /" and used[(253, 5)] == "mounted on /var/lib/appliance-data"
    assert (0, 25) in used  # harmless: no disk is 0:N


def test_the_image_itself_and_character_devices_are_refused(tmp_path: Path) -> None:
    image = make_build(tmp_path / "out")
    with pytest.raises(FlashError, match="the image itself"):
        check_target(describe_target(image), image, {})
    with pytest.raises(FlashError, match="neither a block device nor a regular file"):
        describe_target(Path("/dev/null"))
