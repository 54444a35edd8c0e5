"""The live set: NAME.squashfs, NAME.vmlinuz and NAME.initrd, moved out of DIB's output."""

from __future__ import annotations

import shutil
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


def collect_live_set(squashfs: Path, kernel: Path, initrd: Path, out_dir: Path, name: str) -> LiveSet:
    """Move DIB's squashfs, kernel and initrd into OUT_DIR under the artifact names."""
    live = LiveSet(
        squashfs=out_dir / f"{name}.squashfs",
        kernel=out_dir / f"{name}.vmlinuz",
        initrd=out_dir / f"{name}.initrd",
    )
    for source, target in ((squashfs, live.squashfs), (kernel, live.kernel), (initrd, live.initrd)):
        if not source.is_file():
            raise PackError(f"the build did not produce {source}")
        shutil.move(source, target)
        target.chmod(0o644)
    return live
