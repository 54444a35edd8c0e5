"""Where a file's bytes lie inside a FAT32 file system, found without mounting it.

The node rewrites GRUB's environment block on the ESP in place, as GRUB's own
save_env does: the same 1024 bytes on the same sectors, never a new file. A
file replaced through a mount (or mtools) is deleted and written anew, and a
power cut in between leaves no block at all. Reading the boot sector, the FAT
and the directories is enough to know the sectors; the ESP is made FAT32
(`mkfs.vfat -F 32`), so other FAT types are refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DIR_ENTRY = 32
ATTR_DIRECTORY = 0x10
ATTR_LONG_NAME = 0x0F
END_OF_CHAIN = 0x0FFFFFF8
MAX_CHAIN = 1 << 22


class FatError(Exception):
    """Not a FAT32 file system, or the file is not in it."""


@dataclass(frozen=True)
class Extent:
    offset: int  # bytes from the start of the device or file holding the file system
    length: int


@dataclass(frozen=True)
class Fat32:
    """A FAT32 file system at `offset` bytes into `path` (a partition device, or a disk file)."""

    path: Path
    offset: int = 0

    def _read(self, position: int, length: int) -> bytes:
        with self.path.open("rb") as stream:
            stream.seek(self.offset + position)
            data = stream.read(length)
        if len(data) != length:
            raise FatError(f"{self.path}: short read at {self.offset + position}")
        return data

    def _geometry(self) -> tuple[int, int, int, int, int]:
        """Bytes per sector, sectors per cluster, the FAT's and the data area's byte offsets, the root cluster."""
        boot = self._read(0, 512)
        if boot[510:512] != b"\x55\xaa":
            raise FatError(f"{self.path} at {self.offset}: no FAT boot sector")
        sector = int.from_bytes(boot[11:13], "little")
        per_cluster = boot[13]
        reserved = int.from_bytes(boot[14:16], "little")
        fats = boot[16]
        fat16_size = int.from_bytes(boot[22:24], "little")
        fat32_size = int.from_bytes(boot[36:40], "little")
        if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or fats == 0 or fat16_size != 0:
            raise FatError(f"{self.path} at {self.offset}: not a FAT32 file system")
        root = int.from_bytes(boot[44:48], "little")
        fat_start = reserved * sector
        data_start = (reserved + fats * fat32_size) * sector
        return sector, per_cluster, fat_start, data_start, root

    def _chain(self, first: int, fat_start: int) -> list[int]:
        clusters: list[int] = []
        cluster = first
        while 2 <= cluster < END_OF_CHAIN:
            if len(clusters) >= MAX_CHAIN or cluster in clusters[-1:]:
                raise FatError(f"{self.path}: a cluster chain loops")
            clusters.append(cluster)
            cluster = int.from_bytes(self._read(fat_start + cluster * 4, 4), "little") & 0x0FFFFFFF
        return clusters

    def extents(self, name: str) -> list[Extent]:
        """The byte ranges holding file NAME ("grub/grubenv"), in order; matched by its 8.3 short name."""
        sector, per_cluster, fat_start, data_start, root = self._geometry()
        cluster_bytes = sector * per_cluster

        def where(cluster: int) -> int:
            return data_start + (cluster - 2) * cluster_bytes

        cluster, size, is_dir = root, 0, True
        parts = [part for part in name.split("/") if part]
        for index, part in enumerate(parts):
            if not is_dir:
                raise FatError(f"{'/'.join(parts[:index])} is not a directory")
            cluster, size, is_dir = self._find(part, self._chain(cluster, fat_start), where, cluster_bytes)
        if is_dir:
            raise FatError(f"{name} is a directory")
        extents: list[Extent] = []
        left = size
        for each in self._chain(cluster, fat_start):
            if left <= 0:
                break
            length = min(cluster_bytes, left)
            extents.append(Extent(self.offset + where(each), length))
            left -= length
        if left > 0:
            raise FatError(f"{name}: its cluster chain is shorter than its size")
        return extents

    def _find(
        self, part: str, clusters: list[int], where: Callable[[int], int], cluster_bytes: int
    ) -> tuple[int, int, bool]:
        wanted = short_name(part)
        for cluster in clusters:
            data = self._read(where(cluster), cluster_bytes)
            for start in range(0, cluster_bytes, DIR_ENTRY):
                entry = data[start : start + DIR_ENTRY]
                if entry[0] == 0:
                    raise FatError(f"no {part} in the file system")
                if entry[0] == 0xE5 or entry[11] == ATTR_LONG_NAME:
                    continue
                if entry[:11] == wanted:
                    first = (int.from_bytes(entry[20:22], "little") << 16) | int.from_bytes(entry[26:28], "little")
                    return first, int.from_bytes(entry[28:32], "little"), bool(entry[11] & ATTR_DIRECTORY)
        raise FatError(f"no {part} in the file system")

    def read_file(self, name: str) -> bytes:
        with self.path.open("rb") as stream:
            chunks = []
            for extent in self.extents(name):
                stream.seek(extent.offset)
                chunks.append(stream.read(extent.length))
        return b"".join(chunks)

    def overwrite(self, name: str, data: bytes) -> None:
        """Write DATA over file NAME in place, its length unchanged, and flush it to the device."""
        extents = self.extents(name)
        if sum(extent.length for extent in extents) != len(data):
            raise FatError(f"{name} is {sum(e.length for e in extents)} bytes; in-place writes keep the size")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            done = 0
            for extent in extents:
                os.pwrite(fd, data[done : done + extent.length], extent.offset)
                done += extent.length
            os.fsync(fd)
        finally:
            os.close(fd)


def short_name(name: str) -> bytes:
    """A file name as a FAT directory entry's 8.3 short name ("grubenv" -> b"GRUBENV    ")."""
    base, _, extension = name.upper().partition(".")
    if not base or len(base) > 8 or len(extension) > 3:
        raise FatError(f"{name!r} has no 8.3 short name of its own (FAT long names are not looked up)")
    return base.ljust(8).encode() + extension.ljust(3).encode()
