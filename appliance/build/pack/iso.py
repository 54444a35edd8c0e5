"""A hybrid live ISO (BIOS and UEFI; CD, USB stick or BMC media) made with grub-mkrescue.

grub-mkrescue builds its EFI image with mtools and hands the tree to xorriso,
so nothing here needs a loop device or a vfat/iso9660 mount.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from appliance.build.pack.live import LiveSet
from appliance.run import run

# live-boot looks for /live/*.squashfs on every medium it can see.
ISO_SQUASHFS = "live/filesystem.squashfs"
ISO_KERNEL = "live/vmlinuz"
ISO_INITRD = "live/initrd.img"
# GRUB modules the ISO carries for its menu (grub.cfg.j2), with what they need: GRUB's whole module
# set for both platforms would add 2 MB. The boot images grub-mkrescue makes embed what they need
# to find the ISO and read grub.cfg.
ISO_GRUB_MODULES = (
    "normal", "linux", "configfile", "echo", "test", "true", "sleep", "serial", "terminal", "all_video",
    "iso9660", "part_msdos", "part_gpt", "fat", "ext2", "search", "search_fs_uuid", "search_label",
    "loadenv", "regexp", "reboot", "halt",
    # grub-mkrescue's EFI image loads every partition map it knows before grub.cfg: without these, OVMF's
    # console shows a "file not found" error for each at every boot.
    "part_acorn", "part_amiga", "part_apple", "part_bsd", "part_dfly", "part_dvh", "part_plan", "part_sun",
    "part_sunpc",
)  # fmt: skip


def volume_id(name: str) -> str:
    """An ISO 9660 volume id: upper case, at most 32 characters."""
    return name.upper().replace("-", "_")[:32]


def make_iso(live: LiveSet, grub_cfg: str, iso_path: Path, name: str, extra: Mapping[str, Path] | None = None) -> Path:
    """EXTRA: more files for the tree, by path inside it (what `node install` reads from the medium:
    live/build.json and the disk's boot loader in appliance/disk/)."""
    with tempfile.TemporaryDirectory(prefix="appliance-iso-", dir=iso_path.parent) as staging_name:
        staging = Path(staging_name)
        (staging / "boot" / "grub").mkdir(parents=True)
        (staging / "boot" / "grub" / "grub.cfg").write_text(grub_cfg)
        (staging / "live").mkdir()
        # Hard links: the staging tree sits next to the artifacts, so the
        # squashfs is not copied.
        for source, inside in ((live.squashfs, ISO_SQUASHFS), (live.kernel, ISO_KERNEL), (live.initrd, ISO_INITRD)):
            os.link(source, staging / inside)
        for inside, source in (extra or {}).items():
            (staging / inside).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, staging / inside)
        run(
            [
                "grub-mkrescue",
                "--compress=xz",
                f"--install-modules={' '.join(ISO_GRUB_MODULES)}",
                "--locales=",
                "--themes=",
                "--fonts=",
                "-o",
                str(iso_path),
                str(staging),
                "--",
                "-volid",
                volume_id(name),
            ]
        )
    iso_path.chmod(0o644)
    return iso_path
