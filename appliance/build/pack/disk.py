"""A flashable GPT disk image: NAME.raw, and NAME.qcow2 compressed from it.

  1  bios            GRUB's i386-pc core.img (BIOS boot; boot.img sits in sector 0)
  2  esp             vfat: EFI/BOOT/BOOTX64.EFI, grub/grub.cfg, grub/grubenv
  3  appliance-a     ext4 root slot A: live/filesystem.squashfs, live/vmlinuz, live/initrd.img
  4  appliance-b     ext4 root slot B, same size, empty: an upgrade writes it, then flips grubenv
  5  appliance-data  ext4, small; the node grows it to the end of its disk at boot

Everything is assembled in one sparse file: sfdisk writes the partition table,
mkfs.vfat and mke2fs format each partition in place at its offset (mke2fs -d
fills slot A), mtools fills the ESP, and GRUB's boot.img and core.img are
patched and written by hand, because grub-bios-setup insists on probing a real
block device. No loop device, device-mapper or mount is needed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from appliance.build.pack.live import LiveSet, PackError
from appliance.build.render import BuildIdentity, render_boot_file, render_disk_file
from appliance.run import run, tool
from appliance.spec import Spec

SECTOR = 512
MiB = 1 << 20
GRUB_DIR = Path("/usr/lib/grub")

BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# A type of our own: the node's systemd-repart matches partitions by type, and
# with the slots' generic Linux type it would take slot A for the data partition.
# elements/appliance-data/static/usr/lib/appliance/repart.d/50-data.conf names it too.
DATA_TYPE = "A2D5BDB4-D4D3-5922-90FE-93CCD2F7B268"
# Partition UUIDs are uuid5(this, "BUILD_ID/NAME").
PARTITION_UUID_NAMESPACE = uuid.UUID("5d0c4f4e-7a0b-4c49-9d43-1f3b7ad1a9e2")

SLOT_LABELS = ("appliance-a", "appliance-b")
SLOT_LETTERS = ("a", "b")
DATA_LABEL = "appliance-data"
ESP_LABEL = "APPLIANCE"
GRUBENV_SLOT = "appliance_slot"

BIOS_BOOT_BYTES = 1 * MiB
ESP_BYTES = 64 * MiB
DATA_BYTES = 64 * MiB
SLOT_ALIGN = 64 * MiB
# Room for ext4's own metadata and journal around the slot's files.
SLOT_OVERHEAD = 1.1

# GRUB's boot.img (sector 0). It may own the MBR's code area only: the BIOS
# parameter block it jumps over and the protective MBR from 0x1B8 on stay.
BOOT_CODE_END = 0x1B8
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C  # u64 LBA of core.img's first sector
DRIVE_CHECK = 0x66  # a jmp that trusts the BIOS's drive number; NOPs on hard disks, as grub-bios-setup does
# core.img's first sector (diskboot.img) ends with a blocklist entry: u64 LBA,
# u16 sector count, u16 segment, for the rest of core.img.
BLOCKLIST_SIZE = 12
CORE_REST_SEGMENT = 0x820

GRUB_MODULES = (
    "part_gpt", "fat", "ext2", "search", "search_fs_uuid", "normal", "configfile",
    "linux", "boot", "echo", "test", "loadenv", "serial", "terminal", "regexp",
)  # fmt: skip
BIOS_MODULES = ("biosdisk",)
EFI_MODULES = ("efi_gop",)


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # GPT name; the file systems carry it as their label too
    type_uuid: str
    start: int  # bytes
    size: int  # bytes
    uuid: str  # GPT partition UUID, unique to the build (partition_uuid)

    @property
    def start_lba(self) -> int:
        return self.start // SECTOR

    @property
    def size_lba(self) -> int:
        return self.size // SECTOR

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskLayout:
    partitions: tuple[Partition, ...]
    size: int  # bytes, the backup GPT included

    def partition(self, name: str) -> Partition:
        for partition in self.partitions:
            if partition.name == name:
                return partition
        raise KeyError(name)


@dataclass(frozen=True)
class DiskImages:
    raw: Path
    qcow2: Path
    layout: DiskLayout


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def slot_size(content_bytes: int, budget_bytes: int, kernel_and_initrd_bytes: int) -> int:
    """Bytes for each root slot: room for any later build that keeps to the size budget
    (a squashfs up to the budget, with a kernel and initrd like this build's), so an
    upgrade fits into the other slot; never less than this build's own files."""
    wanted = max(budget_bytes + kernel_and_initrd_bytes, content_bytes)
    return round_up(int(wanted * SLOT_OVERHEAD), SLOT_ALIGN)


def partition_uuid(build_id: str, name: str) -> str:
    """A partition's GPT UUID, derived from the build: the same image flashed twice has the
    same, another build never does, so the kernel can be told which slot to boot by it."""
    return str(uuid.uuid5(PARTITION_UUID_NAMESPACE, f"{build_id}/{name}"))


def plan_layout(slot_bytes: int, build_id: str, esp_bytes: int = ESP_BYTES, data_bytes: int = DATA_BYTES) -> DiskLayout:
    """Partitions in order from 1 MiB on, each aligned to 1 MiB; 1 MiB spare at the end
    holds the backup GPT."""
    wanted = (
        ("bios", BIOS_BOOT_TYPE, BIOS_BOOT_BYTES),
        ("esp", ESP_TYPE, esp_bytes),
        (SLOT_LABELS[0], LINUX_TYPE, slot_bytes),
        (SLOT_LABELS[1], LINUX_TYPE, slot_bytes),
        (DATA_LABEL, DATA_TYPE, data_bytes),
    )
    partitions = []
    start = MiB
    for number, (name, type_uuid, size) in enumerate(wanted, start=1):
        if size % MiB:
            raise ValueError(f"partition {name} is {size} bytes, not a whole number of MiB")
        partitions.append(Partition(number, name, type_uuid, start, size, partition_uuid(build_id, name)))
        start += size
    return DiskLayout(partitions=tuple(partitions), size=start + MiB)


def partition_table_script(layout: DiskLayout, name: str) -> str:
    return render_disk_file(
        "partitions.sfdisk", {"name": name, "first_lba": MiB // SECTOR, "partitions": layout.partitions}
    )


def esp_serial(build_id: str) -> str:
    """The ESP's vfat volume serial as 8 hex digits: unique to the build, so GRUB finds
    this disk's ESP even when another disk carries an older appliance."""
    return hashlib.sha256(build_id.encode()).hexdigest()[:8].upper()


def grub_fs_uuid(serial: str) -> str:
    """How GRUB names a vfat serial: XXXX-XXXX."""
    return f"{serial[:4]}-{serial[4:]}"


def grub_values(layout: DiskLayout, serial: str) -> dict[str, object]:
    """What the GRUB templates need: the ESP's serial, and each root slot's partition
    number and UUID (GRUB reads the slot on its own disk, the kernel finds it by UUID)."""
    slots = [
        {"letter": letter, "number": layout.partition(label).number, "uuid": layout.partition(label).uuid}
        for letter, label in zip(SLOT_LETTERS, SLOT_LABELS, strict=True)
    ]
    return {"esp_uuid": grub_fs_uuid(serial), "slots": slots}


def patch_boot_sector(current: bytes, boot_img: bytes, core_lba: int) -> bytes:
    """Sector 0 with GRUB's boot.img in its code area, pointed at core.img."""
    if len(current) != SECTOR or len(boot_img) != SECTOR:
        raise PackError(f"a boot sector is {SECTOR} bytes (got {len(current)} and {len(boot_img)})")
    sector = bytearray(current)
    sector[:BOOT_CODE_END] = boot_img[:BOOT_CODE_END]
    sector[BPB_START:BPB_END] = current[BPB_START:BPB_END]
    sector[KERNEL_SECTOR : KERNEL_SECTOR + 8] = core_lba.to_bytes(8, "little")
    sector[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(sector)


def patch_core_blocklist(core: bytes, core_lba: int) -> bytes:
    """core.img padded to whole sectors, its first sector told where the rest lies."""
    sectors = round_up(len(core), SECTOR) // SECTOR
    if sectors < 2:
        raise PackError(f"core.img is {len(core)} bytes; GRUB's is always more than one sector")
    padded = bytearray(core.ljust(sectors * SECTOR, b"\0"))
    entry = (
        (core_lba + 1).to_bytes(8, "little")
        + (sectors - 1).to_bytes(2, "little")
        + CORE_REST_SEGMENT.to_bytes(2, "little")
    )
    padded[SECTOR - BLOCKLIST_SIZE : SECTOR] = entry
    return bytes(padded)


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


def make_disk(live: LiveSet, spec: Spec, identity: BuildIdentity, out_dir: Path) -> DiskImages:
    raw = out_dir / f"{spec.name}.raw"
    qcow2 = out_dir / f"{spec.name}.qcow2"
    files = (live.squashfs, live.kernel, live.initrd)
    content = sum(path.stat().st_size for path in files)
    slot = slot_size(content, spec.size_budget_mb * 1_000_000, live.kernel.stat().st_size + live.initrd.stat().st_size)
    layout = plan_layout(slot, identity.build_id)
    serial = esp_serial(identity.build_id)
    values = grub_values(layout, serial)

    raw.unlink(missing_ok=True)
    with raw.open("wb") as stream:
        stream.truncate(layout.size)
    run([tool("sfdisk"), "--quiet", "--no-reread", "--no-tell-kernel", str(raw)],
        input_bytes=partition_table_script(layout, spec.name).encode())  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="appliance-disk-", dir=out_dir) as work_name:
        work = Path(work_name)
        # Slot A's tree, hard-linked: the work directory sits next to the artifacts.
        (work / "slot" / "live").mkdir(parents=True)
        for source, inside in zip(files, ("filesystem.squashfs", "vmlinuz", "initrd.img"), strict=True):
            os.link(source, work / "slot" / "live" / inside)
        format_ext4(raw, layout.partition(SLOT_LABELS[0]), "largefile", work / "slot")
        format_ext4(raw, layout.partition(SLOT_LABELS[1]), "largefile")
        format_ext4(raw, layout.partition(DATA_LABEL), "default")

        esp = layout.partition("esp")
        # One sector per cluster: mkfs.vfat sizes clusters by the whole file, which
        # would leave too few for FAT32 in 64 MiB.
        run([tool("mkfs.vfat"), "--offset", str(esp.start_lba), "-F", "32", "-s", "1", "-n", ESP_LABEL, "-i", serial,
             str(raw), str(esp.size // 1024)])  # fmt: skip
        early = work / "early.cfg"
        early.write_text(render_boot_file("disk-early.cfg", spec, identity, values=values))
        (work / "grub.cfg").write_text(render_boot_file("disk-grub.cfg", spec, identity, values=values))
        grubenv = work / "grubenv"
        run(["grub-editenv", str(grubenv), "create"])
        run(["grub-editenv", str(grubenv), "set", f"{GRUBENV_SLOT}=a"])
        grub_mkimage("x86_64-efi", EFI_MODULES, early, work / "BOOTX64.EFI")
        target = f"{raw}@@{esp.start}"
        env = mtools_env()
        run(["mmd", "-i", target, "::/EFI", "::/EFI/BOOT", "::/grub"], env=env)
        run(["mcopy", "-i", target, str(work / "BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI"], env=env)
        run(["mcopy", "-i", target, str(work / "grub.cfg"), str(grubenv), "::/grub/"], env=env)

        bios = layout.partition("bios")
        core = grub_mkimage("i386-pc", BIOS_MODULES, early, work / "core.img")
        if len(core) > bios.size:
            raise PackError(f"GRUB's core.img is {len(core)} bytes, larger than the BIOS boot partition")
        write_at(raw, bios.start, patch_core_blocklist(core, bios.start_lba))
        with raw.open("rb") as stream:
            sector0 = stream.read(SECTOR)
        boot_img = (GRUB_DIR / "i386-pc" / "boot.img").read_bytes()
        write_at(raw, 0, patch_boot_sector(sector0, boot_img, bios.start_lba))

    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    raw.chmod(0o644)
    qcow2.chmod(0o644)
    return DiskImages(raw=raw, qcow2=qcow2, layout=layout)
