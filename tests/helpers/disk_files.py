"""Reading disk image files as the tests check them: sfdisk for the GPT, blkid for what a partition holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

SECTOR = 512


def gpt_partitions(image: Path) -> list[dict[str, Any]]:
    """The partitions of a raw disk file's GPT, as `sfdisk -J` lists them (in sectors)."""
    listing = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True).stdout
    partitions: list[dict[str, Any]] = json.loads(listing)["partitiontable"]["partitions"]
    return partitions


def probe_partition(image: Path, partition: dict[str, Any]) -> list[str]:
    """What blkid finds in a partition of a disk file: KEY=value lines (LABEL=..., TYPE=...)."""
    offset = str(partition["start"] * SECTOR)
    probe = subprocess.run(["blkid", "-p", "-O", offset, "-o", "export", str(image)],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return probe.stdout.splitlines()


def qcow2_as_raw(qcow2: Path, raw: Path) -> Path:
    """A raw copy of a qcow2 (sparse), for the tools above, which read raw files only."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)], check=True)
    return raw
