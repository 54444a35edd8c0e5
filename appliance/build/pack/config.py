"""The node's configuration layer: the files rendered from appliance.toml, in front of the initrd.

The root image (appliance.build.base) is the same for every node of a package
set; what makes a node this node (/etc/hostname, its operator keys, sshd's
settings, the agent's policy, the network units, build.json) is a handful of
small files. They travel as an uncompressed cpio archive placed before the
base initrd: the kernel unpacks every archive of an initrd in turn, this one
into /appliance/config, and the initramfs script appliance-config copies that
tree over the mounted root before systemd starts. ISO, disk slot and PXE boot
all load the one initrd file, so every medium carries the configuration
without a second root image, and changing it repacks in seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Where the kernel unpacks the tree inside the initramfs; the initramfs script reads it there
# (elements/appliance-live/static/etc/initramfs-tools/scripts/init-bottom/appliance-config).
CONFIG_ROOT = PurePosixPath("appliance/config")
FILE_MODE = 0o100644
DIR_MODE = 0o040755
NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class ConfigFile:
    path: PurePosixPath  # inside the node's root, relative: etc/hostname
    data: bytes


def rendered_config(rendered_dir: Path) -> list[ConfigFile]:
    """The node's files from render_image_files' output (ELEMENT/static/PATH), by their path in the root."""
    files: dict[PurePosixPath, ConfigFile] = {}
    for static in sorted(rendered_dir.glob("*/static")):
        for path in sorted(static.rglob("*")):
            if path.is_file():
                inside = PurePosixPath(path.relative_to(static).as_posix())
                if inside in files:
                    raise ValueError(f"two templates render {inside}")
                files[inside] = ConfigFile(inside, path.read_bytes())
    return [files[path] for path in sorted(files)]


def _align(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _entry(name: str, mode: int, data: bytes, inode: int, mtime: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, 2 if mode == DIR_MODE else 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = NEWC_MAGIC + b"".join(f"{value:08X}".encode() for value in fields)
    return header + encoded + _align(len(header) + len(encoded)) + data + _align(len(data))


def _directories(files: list[ConfigFile]) -> Iterator[PurePosixPath]:
    seen: set[PurePosixPath] = set()
    for file in files:
        for parent in reversed((CONFIG_ROOT / file.path).parents):
            if parent != PurePosixPath(".") and parent not in seen:
                seen.add(parent)
                yield parent


def config_cpio(files: list[ConfigFile], mtime: int) -> bytes:
    """A newc cpio archive (the initramfs format) of FILES below CONFIG_ROOT: owned by root, files
    0644, directories 0755, every time MTIME, so the same configuration gives the same bytes.
    Its length is a multiple of 4, as the kernel wants of an archive another one follows."""
    by_directory = {directory: None for directory in _directories(files)}
    entries = []
    inode = 1
    for directory in by_directory:
        entries.append(_entry(directory.as_posix(), DIR_MODE, b"", inode, mtime))
        inode += 1
    for file in files:
        entries.append(_entry((CONFIG_ROOT / file.path).as_posix(), FILE_MODE, file.data, inode, mtime))
        inode += 1
    entries.append(_entry(TRAILER, 0, b"", 0, 0))
    return b"".join(entries)


def layered_initrd(config: bytes, base_initrd: Path, target: Path) -> Path:
    """TARGET: the configuration archive, then the base initrd unchanged."""
    with target.open("wb") as out:
        out.write(config)
        with base_initrd.open("rb") as base:
            shutil.copyfileobj(base, out, 1 << 20)
    target.chmod(0o644)
    return target
