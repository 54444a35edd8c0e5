"""A flashable GPT disk image: NAME.raw, and NAME.qcow2 compressed from it.

  1  bios            GRUB's i386-pc core.img (BIOS boot; boot.img sits in sector 0)
  2  esp             vfat: EFI/BOOT/BOOTX64.EFI, grub/grub.cfg, grub/grubenv
  3  appliance-a     ext4 root slot A: live/filesystem.squashfs, live/vmlinuz, live/initrd.img,
                     live/boot.cfg (the build's kernel command line, for GRUB), live/build.json
  4  appliance-b     ext4 root slot B, same size, empty: an upgrade writes it, then arms a trial of it
  5  appliance-data  ext4, small; the node grows it to the end of its disk at boot

The layout and the slot's files are appliance.agent.disklayout's, which the
node uses too when it installs itself on a disk from the ISO.

Everything is assembled in one sparse file: sfdisk writes the partition table,
mkfs.vfat and mke2fs format each partition in place at its offset (mke2fs -d
fills slot A), mtools fills the ESP, and GRUB's boot.img and core.img are
patched and written by hand, because grub-bios-setup insists on probing a real
block device. No loop device, device-mapper or mount is needed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.disklayout import (
    BIOS_BOOT_BYTES,
    BOOT_CFG_FILE,
    BOOT_IMG,
    BUILD_INFO_FILE,
    CORE_IMG,
    DATA_BYTES,
    DATA_LABEL,
    DATA_TYPE,
    EFI_IMG,
    ESP_BYTES,
    ESP_LABEL,
    ESP_TYPE,
    GRUB_CFG,
    GRUBENV_SLOT,
    GRUBENV_TRIAL,
    INITRD_FILE,
    KERNEL_FILE,
    LINUX_TYPE,
    SECTOR,
    SLOT_ALIGN,
    SLOT_LABELS,
    SLOT_LETTERS,
    SQUASHFS_FILE,
    DiskLayout,
    LayoutError,
    MiB,
    Partition,
    boot_cfg,
    build_info,
    build_info_text,
    esp_serial,
    grub_fs_uuid,
    partition_uuid,
    plan_layout,
    round_up,
    sfdisk_script,
    slot_size,
)
from appliance.agent.disklayout import patch_boot_sector as _patch_boot_sector
from appliance.agent.disklayout import patch_core_blocklist as _patch_core_blocklist
from appliance.build.pack.live import LiveSet, PackError
from appliance.build.render import BuildIdentity, kernel_cmdline, render_boot_file
from appliance.manifest import sha256_of
from appliance.run import run, tool
from appliance.spec import Spec

# Names the packer's callers and tests use; the layout itself lives in appliance.agent.disklayout.
__all__ = [
    "DATA_BYTES", "DATA_LABEL", "DATA_TYPE", "ESP_BYTES", "ESP_LABEL", "ESP_TYPE", "GRUBENV_SLOT", "LINUX_TYPE",
    "SECTOR", "SLOT_LABELS", "SLOT_LETTERS", "DiskBootFiles", "DiskImages", "DiskLayout", "MiB", "Partition",
    "esp_serial", "grub_fs_uuid", "grub_values", "make_disk", "make_disk_boot_files", "partition_table_script",
    "partition_uuid", "patch_boot_sector", "patch_core_blocklist", "plan_layout", "round_up", "slot_size",
]  # fmt: skip

GRUB_DIR = Path("/usr/lib/grub")

GRUB_MODULES = (
    "part_gpt", "fat", "ext2", "search", "search_fs_uuid", "normal", "configfile",
    "linux", "boot", "echo", "test", "loadenv", "serial", "terminal", "regexp",
)  # fmt: skip
BIOS_MODULES = ("biosdisk",)
EFI_MODULES = ("efi_gop",)


@dataclass(frozen=True)
class DiskImages:
    raw: Path
    qcow2: Path
    layout: DiskLayout


@dataclass(frozen=True)
class DiskBootFiles:
    """What boots a disk of this build: the same bytes for NAME.raw and for a disk the node installs
    itself on from the ISO (which carries them in appliance/disk/). Everything in them follows from
    the build id (the ESP's serial, the slots' partition UUIDs) and the fixed BIOS boot partition."""

    core_img: Path  # its blocklist patched for the BIOS boot partition at 1 MiB
    boot_img: Path
    efi: Path
    grub_cfg: Path

    def by_name(self) -> dict[str, Path]:
        return {CORE_IMG: self.core_img, BOOT_IMG: self.boot_img, EFI_IMG: self.efi, GRUB_CFG: self.grub_cfg}


def partition_table_script(layout: DiskLayout, name: str) -> str:
    return sfdisk_script(layout, name)


def patch_boot_sector(current: bytes, boot_img: bytes, core_lba: int) -> bytes:
    try:
        return _patch_boot_sector(current, boot_img, core_lba)
    except LayoutError as error:
        raise PackError(str(error)) from error


def patch_core_blocklist(core: bytes, core_lba: int) -> bytes:
    try:
        return _patch_core_blocklist(core, core_lba)
    except LayoutError as error:
        raise PackError(str(error)) from error


def grub_values(layout: DiskLayout, serial: str) -> dict[str, object]:
    """What the GRUB templates need: the ESP's serial, and each root slot's partition
    number and UUID (GRUB reads the slot on its own disk, the kernel finds it by UUID)."""
    slots = [
        {"letter": letter, "number": layout.partition(label).number, "uuid": layout.partition(label).uuid}
        for letter, label in zip(SLOT_LETTERS, SLOT_LABELS, strict=True)
    ]
    return {"esp_uuid": grub_fs_uuid(serial), "slots": slots}


def write_at(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def grub_mkimage(platform: str, modules: tuple[str, ...], early_cfg: Path, output: Path) -> bytes:
    run(
        [
            "grub-mkimage",
            "-O",
            platform,
            "-d",
            str(GRUB_DIR / platform),
            "-c",
            str(early_cfg),
            # The early config sets the real prefix once it has found the ESP.
            "-p",
            "/grub",
            "-o",
            str(output),
            *GRUB_MODULES,
            *modules,
        ]
    )
    return output.read_bytes()


def format_ext4(image: Path, partition: Partition, kind: str, content: Path | None = None) -> None:
    argv = [tool("mke2fs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-T", kind, "-L", partition.name]
    argv += ["-E", f"offset={partition.start},root_owner=0:0"]
    if content is not None:
        argv += ["-d", str(content)]
    run([*argv, str(image), f"{partition.size // 1024}k"])


def mtools_env() -> dict[str, str]:
    # mtools refuses a file system whose geometry looks odd to it; ours is made by mkfs.vfat.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def slot_tree(live: LiveSet, spec: Spec, identity: BuildIdentity, arch: str, tree: Path) -> None:
    """A root slot's files, hard-linked into TREE/live (the tree sits next to the artifacts): the
    live set, boot.cfg with the build's kernel command line, and build.json."""
    live_dir = tree / "live"
    live_dir.mkdir(parents=True)
    for source, inside in zip(live.files(), (SQUASHFS_FILE, KERNEL_FILE, INITRD_FILE), strict=True):
        os.link(source, live_dir / inside)
    cmdline = kernel_cmdline(spec)
    (live_dir / BOOT_CFG_FILE).write_text(boot_cfg(cmdline, identity.build_id))
    (live_dir / BUILD_INFO_FILE).write_text(build_info_text(live_build_info(live, spec, identity, arch)))


def live_build_info(live: LiveSet, spec: Spec, identity: BuildIdentity, arch: str) -> dict[str, object]:
    """build.json of the live set, for a slot and for the ISO's live/ (where `node install` reads it)."""
    files = {
        inside: (source.stat().st_size, sha256_of(source))
        for source, inside in zip(live.files(), (SQUASHFS_FILE, KERNEL_FILE, INITRD_FILE), strict=True)
    }
    return build_info(spec.name, identity.build_id, arch, kernel_cmdline(spec), files)


def make_disk_boot_files(spec: Spec, identity: BuildIdentity, work: Path) -> DiskBootFiles:
    """GRUB's images and menu for this build's disk, made into WORK."""
    work.mkdir(parents=True, exist_ok=True)
    # Only partition numbers and UUIDs reach the menu, and neither depends on the slots' size.
    values = grub_values(plan_layout(SLOT_ALIGN, identity.build_id), esp_serial(identity.build_id))
    early = work / "early.cfg"
    early.write_text(render_boot_file("disk-early.cfg", spec, identity, values=values))
    grub_cfg = work / GRUB_CFG
    grub_cfg.write_text(render_boot_file("disk-grub.cfg", spec, identity, values=values))
    efi = work / EFI_IMG
    grub_mkimage("x86_64-efi", EFI_MODULES, early, efi)
    core = grub_mkimage("i386-pc", BIOS_MODULES, early, work / "core.unpatched.img")
    if len(core) > BIOS_BOOT_BYTES:
        raise PackError(f"GRUB's core.img is {len(core)} bytes, larger than the BIOS boot partition")
    core_img = work / CORE_IMG
    core_img.write_bytes(patch_core_blocklist(core, BIOS_BOOT_BYTES // SECTOR))
    boot_img = work / BOOT_IMG
    boot_img.write_bytes((GRUB_DIR / "i386-pc" / "boot.img").read_bytes())
    return DiskBootFiles(core_img=core_img, boot_img=boot_img, efi=efi, grub_cfg=grub_cfg)


def make_disk(
    live: LiveSet, spec: Spec, identity: BuildIdentity, out_dir: Path, boot: DiskBootFiles, arch: str
) -> DiskImages:
    raw = out_dir / f"{spec.name}.raw"
    qcow2 = out_dir / f"{spec.name}.qcow2"
    content = sum(path.stat().st_size for path in live.files())
    slot = slot_size(content, spec.size_budget_mb * 1_000_000, live.kernel.stat().st_size + live.initrd.stat().st_size)
    layout = plan_layout(slot, identity.build_id)
    serial = esp_serial(identity.build_id)

    raw.unlink(missing_ok=True)
    with raw.open("wb") as stream:
        stream.truncate(layout.size)
    run([tool("sfdisk"), "--quiet", "--no-reread", "--no-tell-kernel", str(raw)],
        input_bytes=partition_table_script(layout, spec.name).encode())  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="appliance-disk-", dir=out_dir) as work_name:
        work = Path(work_name)
        slot_tree(live, spec, identity, arch, work / "slot")
        format_ext4(raw, layout.partition(SLOT_LABELS[0]), "largefile", work / "slot")
        format_ext4(raw, layout.partition(SLOT_LABELS[1]), "largefile")
        format_ext4(raw, layout.partition(DATA_LABEL), "default")

        esp = layout.partition("esp")
        # One sector per cluster: mkfs.vfat sizes clusters by the whole file, which
        # would leave too few for FAT32 in 64 MiB.
        run([tool("mkfs.vfat"), "--offset", str(esp.start_lba), "-F", "32", "-s", "1", "-n", ESP_LABEL, "-i", serial,
             str(raw), str(esp.size // 1024)])  # fmt: skip
        grubenv = work / "grubenv"
        run(["grub-editenv", str(grubenv), "create"])
        run(["grub-editenv", str(grubenv), "set", f"{GRUBENV_SLOT}=a", f"{GRUBENV_TRIAL}="])
        target = f"{raw}@@{esp.start}"
        env = mtools_env()
        run(["mmd", "-i", target, "::/EFI", "::/EFI/BOOT", "::/grub"], env=env)
        run(["mcopy", "-i", target, str(boot.efi), "::/EFI/BOOT/BOOTX64.EFI"], env=env)
        run(["mcopy", "-i", target, str(boot.grub_cfg), str(grubenv), "::/grub/"], env=env)

        bios = layout.partition("bios")
        write_at(raw, bios.start, boot.core_img.read_bytes())
        with raw.open("rb") as stream:
            sector0 = stream.read(SECTOR)
        write_at(raw, 0, patch_boot_sector(sector0, boot.boot_img.read_bytes(), bios.start_lba))

    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    raw.chmod(0o644)
    qcow2.chmod(0o644)
    return DiskImages(raw=raw, qcow2=qcow2, layout=layout)
