"""A disk's GPT partitions, read from the disk itself (a block device, or a disk image file in tests)."""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
SIGNATURE = b"EFI PART"


class GptError(Exception):
    """The disk holds no GPT this reader takes."""


@dataclass(frozen=True)
class GptPartition:
    number: int
    name: str
    type_uuid: str  # upper case, as sfdisk and the layout write them
    uuid: str  # lower case, as /dev/disk/by-partuuid names them
    start: int  # bytes
    size: int  # bytes


def guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def read_gpt(disk: Path) -> list[GptPartition]:
    """The used entries of the primary GPT, in table order; its header's CRC is checked."""
    with disk.open("rb") as stream:
        stream.seek(SECTOR)
        header = stream.read(SECTOR)
        if header[:8] != SIGNATURE:
            raise GptError(f"{disk} has no GPT")
        size = int.from_bytes(header[12:16], "little")
        if not 92 <= size <= SECTOR:
            raise GptError(f"{disk}: GPT header of {size} bytes")
        check = bytearray(header[:size])
        check[16:20] = b"\0\0\0\0"
        if zlib.crc32(check) != int.from_bytes(header[16:20], "little"):
            raise GptError(f"{disk}: the GPT header's checksum does not match")
        entries_lba = int.from_bytes(header[72:80], "little")
        count = int.from_bytes(header[80:84], "little")
        entry_size = int.from_bytes(header[84:88], "little")
        if count > 1024 or entry_size < 128:
            raise GptError(f"{disk}: {count} GPT entries of {entry_size} bytes")
        stream.seek(entries_lba * SECTOR)
        table = stream.read(count * entry_size)
    partitions = []
    for index in range(count):
        entry = table[index * entry_size : (index + 1) * entry_size]
        if entry[:16] == b"\0" * 16:
            continue
        first = int.from_bytes(entry[32:40], "little")
        last = int.from_bytes(entry[40:48], "little")
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        partitions.append(
            GptPartition(
                number=index + 1,
                name=name,
                type_uuid=guid(entry[:16]).upper(),
                uuid=guid(entry[16:32]),
                start=first * SECTOR,
                size=(last - first + 1) * SECTOR,
            )
        )
    return partitions
