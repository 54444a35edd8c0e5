"""The live set: NAME.squashfs, NAME.vmlinuz and NAME.initrd, which every boot medium carries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError


@dataclass(frozen=True)
class LiveSet:
    squashfs: Path
    kernel: Path
    initrd: Path

    def files(self) -> tuple[Path, Path, Path]:
        """Squashfs, kernel, initrd: the order the ISO and the disk's slots list them in."""
        return (self.squashfs, self.kernel, self.initrd)


class PackError(ApplianceError):
    """An artifact could not be made from the build result."""
