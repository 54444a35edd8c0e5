"""Install media, boot order and display: what an image of the store is, by its content, and QEMU's part
of the command line for a guest's CD-ROM, boot order and graphical console.

An image's kind is read from its first bytes when it is imported (names do not
say), and kept in its row; rows of older agents have none, and get theirs the
first time it is asked for. A CD-ROM must be an ISO: an installer's disk image
attached as a CD would boot nothing and say nothing about why.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from appliance.agent.errors import AgentError, ErrorCode, image_not_found
from appliance.agent.model import BootDevice, GuestSpec, check_name, invalid_field
from appliance.agent.store import Store


class ImageKind(StrEnum):
    DISK = "disk"  # qcow2, or raw with a partition table or a boot sector
    ISO = "iso"  # ISO 9660: a CD-ROM
    KERNEL = "kernel"  # a Linux bzImage
    INITRD = "initrd"  # a cpio archive, or compressed (as initramfs images are)
    UNKNOWN = "unknown"


# ISO 9660's first volume descriptor starts at sector 16 (2048-byte sectors): a type byte, then CD001.
ISO_MAGIC = (0x8001, b"CD001")
# The Linux boot protocol's header signature in a bzImage's setup.
KERNEL_MAGIC = (0x202, b"HdrS")
QCOW2_MAGIC = b"QFI\xfb"
GPT_MAGIC = (512, b"EFI PART")
BOOT_SIGNATURE = (510, b"\x55\xaa")
INITRD_MAGICS = (
    b"070701",  # cpio newc
    b"070702",  # cpio newc with checksums
    b"070707",  # cpio odc
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\x02\x21\x4c\x18",  # lz4 (legacy, as the kernel reads it)
    b"BZh",  # bzip2
    b"\x5d\x00\x00",  # lzma
)
HEAD_BYTES = ISO_MAGIC[0] + len(ISO_MAGIC[1])


def detect_kind(path: Path) -> ImageKind:
    """What the file holds, from its first 32 KiB. A bzImage and a hybrid ISO carry a boot sector
    too, so the more particular signatures are tried first."""
    with path.open("rb") as image:
        head = image.read(HEAD_BYTES)
    return kind_of(head)


def kind_of(head: bytes) -> ImageKind:
    def at(offset: int, magic: bytes) -> bool:
        return head[offset : offset + len(magic)] == magic

    if head.startswith(QCOW2_MAGIC):
        return ImageKind.DISK
    if at(*ISO_MAGIC):
        return ImageKind.ISO
    if at(*KERNEL_MAGIC):
        return ImageKind.KERNEL
    if any(head.startswith(magic) for magic in INITRD_MAGICS):
        return ImageKind.INITRD
    if at(*GPT_MAGIC) or at(*BOOT_SIGNATURE):
        return ImageKind.DISK
    return ImageKind.UNKNOWN


def image_kind(store: Store, images_dir: Path, name: str) -> ImageKind:
    """The kind of an image of the store: from its row, or detected (and kept) for rows that predate kinds."""
    for image in store.images():
        if image["name"] != name:
            continue
        if image["kind"]:
            return ImageKind(str(image["kind"]))
        path = images_dir / check_name(name)
        if not path.is_file():
            raise image_not_found(name)
        kind = detect_kind(path)
        store.set_image_kind(name, kind)
        return kind
    raise image_not_found(name)


def check_cdrom(store: Store, images_dir: Path, spec: GuestSpec) -> None:
    """A guest's CD-ROM is an ISO of the store; anything else is refused, naming what it is."""
    if not spec.cdrom:
        return
    try:
        kind = image_kind(store, images_dir, spec.cdrom)
    except AgentError as error:
        if error.code is not ErrorCode.IMAGE_NOT_FOUND:
            raise
        raise invalid_field("cdrom", f"no image named {spec.cdrom!r} in the image store") from error
    if kind is not ImageKind.ISO:
        raise invalid_field("cdrom", f"image {spec.cdrom!r} is a {kind} image, not an ISO (a CD-ROM needs kind iso)")


def boot_indexes(spec: GuestSpec) -> dict[BootDevice, int]:
    """Each device of the boot order and its first boot index (disks and NICs count up from it).
    Indexes start at 1: QEMU's -kernel option ROM holds 0."""
    indexes: dict[BootDevice, int] = {}
    next_index = 1
    for device in spec.boot_order:
        if device is BootDevice.KERNEL:
            continue
        indexes[device] = next_index
        next_index += {BootDevice.DISK: len(spec.disks), BootDevice.NETWORK: len(spec.nics)}.get(device, 1)
    return indexes


def bootindex(indexes: dict[BootDevice, int], device: BootDevice, number: int = 0) -> str:
    """`,bootindex=N` for the number-th device of its kind when the boot order names it, else nothing."""
    return f",bootindex={indexes[device] + number}" if device in indexes else ""


def cdrom_argv(path: Path, indexes: dict[BootDevice, int]) -> list[str]:
    """The ISO read-only on the q35 machine's own AHCI controller."""
    return [
        "-drive", f"file={path},if=none,id=cdrom0,media=cdrom,readonly=on,format=raw",
        "-device", f"ide-cd,drive=cdrom0,bus=ide.0{bootindex(indexes, BootDevice.CDROM)}",
    ]  # fmt: skip


def boot_argv(spec: GuestSpec) -> list[str]:
    """With a boot order, the firmware tries only what it names (as libvirt does)."""
    return ["-boot", "strict=on"] if spec.boot_order else []


def display_argv(vnc_socket: Path) -> list[str]:
    """A VGA card and QEMU's VNC server on a unix socket in the guest's directory: no TCP port on the
    node; guest.display_attach relays it through the operator's SSH connection."""
    return ["-device", "VGA", "-vnc", f"unix:{vnc_socket}"]


# Empty PCIe root ports every guest gets, after its other devices (which so keep their addresses):
# q35's root bus takes no hot-plugged device, a root port takes one (disks.py's hot-plug).
HOTPLUG_PORTS = 4
HOTPLUG_PORT_PREFIX = "hotplug"


def hotplug_ports_argv() -> list[str]:
    argv: list[str] = []
    for number in range(HOTPLUG_PORTS):
        argv += ["-device", f"pcie-root-port,id={HOTPLUG_PORT_PREFIX}{number},chassis={number + 1}"]
    return argv
