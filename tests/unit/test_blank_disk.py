"""Which disk the node may claim for its state, and how it is claimed.

`blank-disk` reads sysfs, which cannot be made up on a running kernel, so the
first test lays a /sys/block tree out in a directory, with each disk a real
file that the real blkid probes. The second runs the element's own
systemd-repart definition on a blank file, as the node runs it on a disk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers.disk_files import gpt_partitions, probe_partition

from appliance.build.layout import ELEMENTS_DIR
from appliance.build.pack.disk import DATA_LABEL, DATA_TYPE

DATA_ELEMENT = ELEMENTS_DIR / "appliance-data"
BLANK_DISK = DATA_ELEMENT / "static/usr/lib/appliance/blank-disk"
REPART_DEFINITIONS = DATA_ELEMENT / "static/usr/lib/appliance/repart.d"
GIB = 1 << 30


def add_disk(
    root: Path,
    name: str,
    size: int = 2 * GIB,
    *,
    device: bool = True,
    readonly: bool = False,
    removable: bool = False,
    partition: bool = False,
    holder: bool = False,
    node: bool = True,
) -> Path:
    sys = root / "sys/block" / name
    (sys / "holders").mkdir(parents=True)
    if device:
        (sys / "device").mkdir()
    (sys / "ro").write_text("1\n" if readonly else "0\n")
    (sys / "removable").write_text("1\n" if removable else "0\n")
    (sys / "size").write_text(f"{size // 512}\n")
    if partition:
        (sys / f"{name}1").mkdir()
    if holder:
        (sys / "holders" / "dm-0").mkdir()
    image = root / "dev" / name
    if node:
        image.parent.mkdir(exist_ok=True)
        with image.open("wb") as file:
            file.truncate(size)
    return image


def blank_disk(root: Path) -> str:
    result = subprocess.run(
        [str(BLANK_DISK)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYS_BLOCK": str(root / "sys/block"), "DEV": str(root / "dev")},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_only_a_fixed_writable_disk_with_nothing_on_it_is_blank(tmp_path: Path) -> None:
    add_disk(tmp_path, "loop0", device=False)
    add_disk(tmp_path, "sda", partition=True)
    add_disk(tmp_path, "sdb", removable=True)
    add_disk(tmp_path, "sdc", readonly=True)
    add_disk(tmp_path, "sdd", size=512 << 20)
    add_disk(tmp_path, "sde", holder=True)
    ext4 = add_disk(tmp_path, "sdf")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True)
    gpt = add_disk(tmp_path, "sdg")
    subprocess.run(["sfdisk", "-q", str(gpt)], input="label: gpt\n", text=True, check=True)
    add_disk(tmp_path, "sdgz", node=False)
    assert blank_disk(tmp_path) == ""
    add_disk(tmp_path, "sdh")
    add_disk(tmp_path, "sdi")
    assert blank_disk(tmp_path) == str(tmp_path / "dev/sdh")


def test_a_claimed_disk_gets_the_data_partition_once(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with disk.open("wb") as file:
        file.truncate(GIB)
    claim = ["systemd-repart", "--empty=require", "--dry-run=no", "--no-pager", f"--definitions={REPART_DEFINITIONS}"]
    subprocess.run([*claim, str(disk)], capture_output=True, check=True)
    (partition,) = gpt_partitions(disk)
    assert partition["name"] == DATA_LABEL and partition["type"] == DATA_TYPE.upper()
    # It fills the disk, less GPT's own room at each end.
    assert partition["size"] * 512 > GIB - (4 << 20)
    probe = probe_partition(disk, partition)
    assert f"LABEL={DATA_LABEL}" in probe and "TYPE=ext4" in probe
    # A second claim (a disk that is no longer blank) is refused, not redone.
    again = subprocess.run([*claim, str(disk)], capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "refusing" in again.stderr
