"""GRUB's environment block on the ESP, read and rewritten in place without a mount; the GPT as the node reads it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.appliance_disk import MTOOLS, make_disk, stand_in_build
from helpers.disk_files import gpt_partitions

from appliance.agent.fat import Fat32, FatError, short_name
from appliance.agent.gpt import GptError, read_gpt
from appliance.agent.grubenv import SIGNATURE, GrubEnv, GrubEnvError, parse, render


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, int]:
    build = stand_in_build(tmp_path / "build", "appliance-20260101T000000Z-aaaa0000")
    path = tmp_path / "disk.raw"
    layout = make_disk(path, build)
    return path, layout.partition("esp").start


def esp_clusters(disk: Path, offset: int) -> str:
    """Where mtools says grub/grubenv lies: its clusters."""
    done = subprocess.run(["mshowfat", "-i", f"{disk}@@{offset}", "::/grub/grubenv"],
                          capture_output=True, text=True, check=True, env=MTOOLS)  # fmt: skip
    return done.stdout


def test_the_block_made_by_grub_editenv_reads_back(disk: tuple[Path, int]) -> None:
    path, offset = disk
    assert GrubEnv(path, offset).read() == {"appliance_slot": "a", "appliance_trial": ""}


def test_an_update_is_written_in_place_and_grub_editenv_reads_it(disk: tuple[Path, int], tmp_path: Path) -> None:
    path, offset = disk
    before = esp_clusters(path, offset)
    GrubEnv(path, offset).update(appliance_trial="b", appliance_taken="")
    # The same sectors: GRUB's save_env, and a power cut, see one block or the other, never none.
    assert esp_clusters(path, offset) == before
    copy = tmp_path / "env"
    subprocess.run(["mcopy", "-n", "-i", f"{path}@@{offset}", "::/grub/grubenv", str(copy)], check=True, env=MTOOLS)
    listed = subprocess.run(["grub-editenv", str(copy), "list"], capture_output=True, text=True, check=True).stdout
    assert listed.splitlines() == ["appliance_slot=a", "appliance_trial=b", "appliance_taken="]
    assert len(copy.read_bytes()) == 1024 and copy.read_bytes().startswith(SIGNATURE)
    # Only the first sector changes: one sector written whole.
    assert copy.read_bytes()[512:] == b"#" * 512


def test_variables_that_would_not_fit_one_sector_or_read_back_are_refused() -> None:
    with pytest.raises(GrubEnvError, match="one sector"):
        render({f"v{index}": "x" * 40 for index in range(20)})
    for value in ("a b", "a\nb", "$x", 'q"'):
        with pytest.raises(GrubEnvError):
            render({"appliance_slot": value})
    with pytest.raises(GrubEnvError):
        parse(b"not an env block".ljust(1024, b"#"))
    assert parse(render({"a": "1", "b": ""})) == {"a": "1", "b": ""}


def test_fat_reader_finds_nested_files_and_refuses_what_it_cannot_read(disk: tuple[Path, int], tmp_path: Path) -> None:
    path, offset = disk
    fat = Fat32(path, offset)
    assert fat.read_file("grub/grubenv").startswith(SIGNATURE)
    with pytest.raises(FatError, match="no nothing"):
        fat.read_file("grub/nothing")
    with pytest.raises(FatError, match="keep the size"):
        fat.overwrite("grub/grubenv", b"short")
    with pytest.raises(FatError, match=r"8\.3"):
        short_name("a-very-long-name.cfg")
    # Sector 0 of the disk: a protective MBR, not a FAT boot sector.
    with pytest.raises(FatError, match="not a FAT32"):
        Fat32(path, 0).read_file("grub/grubenv")
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(b"\0" * 4096)
    with pytest.raises(FatError, match="no FAT boot sector"):
        Fat32(zeros).read_file("grub/grubenv")
    small = tmp_path / "fat16.img"
    subprocess.run(["mkfs.vfat", "-C", "-F", "16", str(small), "16384"], check=True, capture_output=True)
    with pytest.raises(FatError, match="not a FAT32"):
        Fat32(small).read_file("grub/grubenv")


def test_the_gpt_reader_sees_what_sfdisk_wrote(disk: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = disk
    ours = read_gpt(path)
    theirs = gpt_partitions(path)
    assert [(p.number, p.name, p.type_uuid, p.uuid.upper(), p.start // 512, p.size // 512) for p in ours] == [
        (
            int(part["node"].removeprefix(str(path))),
            part["name"],
            part["type"],
            part["uuid"],
            part["start"],
            part["size"],
        )
        for part in theirs
    ]
    blank = tmp_path / "blank.raw"
    blank.write_bytes(b"\0" * 4096)
    with pytest.raises(GptError, match="no GPT"):
        read_gpt(blank)
    corrupt = tmp_path / "corrupt.raw"
    data = bytearray(path.read_bytes()[: 1 << 20])
    data[512 + 40] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(GptError, match="checksum"):
        read_gpt(corrupt)
