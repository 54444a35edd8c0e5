"""Files read out of an ISO 9660 volume without mounting it: a provisioner's cidata or config-2 ISO.

genisoimage and xorriso (`-J -r`), which cloud-localds, Nova and Ironic use,
write a Joliet tree with the real names (UTF-16); without one the plain ISO
9660 names are used, matched without case and version (`META_DAT.;1`).
"""

from __future__ import annotations

from pathlib import Path

BLOCK = 2048
FIRST_DESCRIPTOR = 16
JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
MAX_FILE = 1 << 20


class IsoError(Exception):
    """Not an ISO 9660 volume, or a file not in it."""


class IsoVolume:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.root, self.joliet = self._root()

    def _read(self, block: int, length: int) -> bytes:
        with self.path.open("rb") as stream:
            stream.seek(block * BLOCK)
            return stream.read(length)

    def _root(self) -> tuple[bytes, bool]:
        primary = b""
        for index in range(FIRST_DESCRIPTOR, FIRST_DESCRIPTOR + 32):
            descriptor = self._read(index, BLOCK)
            if descriptor[1:6] != b"CD001":
                raise IsoError(f"{self.path} is not an ISO 9660 volume")
            kind = descriptor[0]
            if kind == 2 and descriptor[88:91] in JOLIET_ESCAPES:
                return descriptor[156:190], True
            if kind == 1 and not primary:
                primary = descriptor[156:190]
            if kind == 255:
                break
        if not primary:
            raise IsoError(f"{self.path} has no primary volume descriptor")
        return primary, False

    def _entries(self, record: bytes) -> dict[str, tuple[bytes, bool]]:
        """A directory's entries by lower-case name: (their record, whether a directory)."""
        extent = int.from_bytes(record[2:6], "little")
        size = int.from_bytes(record[10:14], "little")
        data = self._read(extent, size)
        entries: dict[str, tuple[bytes, bool]] = {}
        at = 0
        while at < len(data):
            length = data[at]
            if length == 0:
                # Records never cross a block: the rest of this one is padding.
                at = (at // BLOCK + 1) * BLOCK
                continue
            entry = data[at : at + length]
            name_length = entry[32]
            raw = entry[33 : 33 + name_length]
            if raw not in (b"\0", b"\1"):
                name = raw.decode("utf-16-be", errors="replace") if self.joliet else raw.decode("ascii", "replace")
                name = name.split(";", 1)[0]
                if not self.joliet and name.endswith("."):
                    name = name[:-1]
                entries[name.lower()] = (entry, bool(entry[25] & 0x02))
            at += length
        return entries

    def read_file(self, name: str) -> bytes:
        record, is_dir = self.root, True
        for part in [part for part in name.split("/") if part]:
            if not is_dir:
                raise IsoError(f"{name}: not a directory on the way")
            found = self._entries(record).get(part.lower())
            if found is None:
                raise IsoError(f"no {name} on {self.path}")
            record, is_dir = found
        if is_dir:
            raise IsoError(f"{name} is a directory")
        extent = int.from_bytes(record[2:6], "little")
        size = int.from_bytes(record[10:14], "little")
        return self._read(extent, min(size, MAX_FILE))
