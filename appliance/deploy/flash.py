"""`appliance flash`: write the disk image to a disk (or a file), then read it back to verify.

A target is refused when it, or any partition of it, is mounted or used as
swap: that covers the disk holding the running system. A block device is also
opened with O_EXCL, which the kernel refuses while anything holds it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.manifest import ArtifactKind, Manifest

CHUNK = 4 << 20
MB = 1_000_000


class FlashError(ApplianceError):
    """The image cannot be written to this target, or did not read back the same."""


@dataclass(frozen=True)
class Target:
    path: Path
    block_device: bool
    devices: frozenset[tuple[int, int]]  # (major, minor) of the device and its partitions; empty for a file


@dataclass(frozen=True)
class FlashResult:
    image: Path
    target: Path
    size_bytes: int
    sha256: str
    seconds: float


def find_image(out_dir: Path) -> tuple[Path, int, str]:
    """NAME.raw of the build in OUT_DIR, with its size and sha256 from the manifest."""
    manifest = Manifest.load(out_dir)
    image = manifest.artifact(ArtifactKind.DISK_RAW)
    if not image.is_file():
        raise FlashError(f"{image} is listed in the manifest but missing")
    (entry,) = manifest.artifacts_of(ArtifactKind.DISK_RAW)
    return image, entry.size_bytes, entry.sha256


def describe_target(path: Path, sys_block: Path = Path("/sys/dev/block")) -> Target:
    try:
        info = path.stat()
    except FileNotFoundError:
        return Target(path, block_device=False, devices=frozenset())
    if stat.S_ISREG(info.st_mode):
        return Target(path, block_device=False, devices=frozenset())
    if not stat.S_ISBLK(info.st_mode):
        raise FlashError(f"{path} is neither a block device nor a regular file")
    device = (os.major(info.st_rdev), os.minor(info.st_rdev))
    devices = {device}
    # /sys/dev/block/MAJ:MIN is the disk; its partitions are subdirectories with a dev file.
    node = sys_block / f"{device[0]}:{device[1]}"
    for dev_file in node.glob("*/dev"):
        major, _, minor = dev_file.read_text().strip().partition(":")
        devices.add((int(major), int(minor)))
    return Target(path, block_device=True, devices=frozenset(devices))


def devices_in_use(mountinfo: str, swaps: str) -> dict[tuple[int, int], str]:
    """Block devices mounted (from /proc/self/mountinfo) or swapped on (from /proc/swaps), with where."""
    used: dict[tuple[int, int], str] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            used.setdefault((int(major), int(minor)), f"mounted on {fields[4]}")
    for line in swaps.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].startswith("/dev/"):
            try:
                rdev = os.stat(fields[0]).st_rdev
            except OSError:
                continue
            used.setdefault((os.major(rdev), os.minor(rdev)), "used as swap")
    return used


def check_target(target: Target, image: Path, used: dict[tuple[int, int], str]) -> None:
    if target.path.exists() and target.path.resolve() == image.resolve():
        raise FlashError(f"{target.path} is the image itself")
    busy = sorted(
        f"{major}:{minor} {where}" for (major, minor), where in used.items() if (major, minor) in target.devices
    )
    if busy:
        raise FlashError(f"refusing to write {target.path}: it is in use ({'; '.join(busy)})")
    if target.block_device or not target.path.exists():
        return
    # A file in use as a mounted loop device's backing store is as busy as a disk.
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if Path(backing.read_text().strip()) == target.path.resolve():
            raise FlashError(f"refusing to write {target.path}: it backs {backing.parts[3]}")


def read_system_state() -> dict[tuple[int, int], str]:
    swaps = Path("/proc/swaps")
    return devices_in_use(
        Path("/proc/self/mountinfo").read_text(), swaps.read_text() if swaps.exists() else "Filename\n"
    )


def open_target(target: Target, size: int) -> int:
    if target.block_device:
        try:
            # O_EXCL on a block device: the kernel refuses while it is mounted or otherwise held.
            fd = os.open(target.path, os.O_WRONLY | os.O_EXCL)
        except OSError as error:
            raise FlashError(f"cannot open {target.path} for writing: {error.strerror}") from error
        capacity = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if capacity < size:
            os.close(fd)
            raise FlashError(f"{target.path} holds {capacity / MB:.0f} MB; the image needs {size / MB:.0f} MB")
        return fd
    try:
        fd = os.open(target.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as error:
        raise FlashError(f"cannot open {target.path} for writing: {error.strerror}") from error
    os.ftruncate(fd, size)
    return fd


def write_image(image: Path, target: Target, size: int, progress: Callable[[int, int], None]) -> str:
    """Copy IMAGE onto TARGET; returns the sha256 of what was read from the image."""
    digest = hashlib.sha256()
    zeros = bytes(CHUNK)
    fd = open_target(target, size)
    try:
        with image.open("rb") as source:
            done = 0
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
                # A file target was truncated to size, so it reads zeros where
                # the image has them: skipping them keeps it as sparse as the image.
                if target.block_device or block != zeros[: len(block)]:
                    os.pwrite(fd, block, done)
                done += len(block)
                progress(done, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_back(target: Target, size: int) -> str:
    fd = os.open(target.path, os.O_RDONLY)
    try:
        # Drop what the write left in the page cache, so the check reads the medium.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            block = os.read(fd, min(CHUNK, remaining))
            if not block:
                raise FlashError(f"{target.path} ended {remaining} bytes before the image did")
            digest.update(block)
            remaining -= len(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def flash(
    out_dir: Path,
    target_path: Path,
    confirm: Callable[[str], bool],
    progress: Callable[[int, int], None],
    used: dict[tuple[int, int], str] | None = None,
) -> FlashResult:
    """Write OUT_DIR's NAME.raw to TARGET_PATH once `confirm` agrees, then verify it by sha256."""
    image, size, expected = find_image(out_dir)
    target = describe_target(target_path)
    check_target(target, image, read_system_state() if used is None else used)
    what = "block device" if target.block_device else "file"
    if not confirm(f"write {image.name} ({size / MB:.0f} MB) to {what} {target_path}, destroying what it holds?"):
        raise FlashError("not confirmed; nothing written")
    started = time.monotonic()
    written = write_image(image, target, size, progress)
    if written != expected:
        raise FlashError(
            f"{image} does not match its manifest (sha256 {written}, manifest {expected}): "
            f"rebuild it, and do not boot {target_path}"
        )
    found = read_back(target, size)
    if found != expected:
        raise FlashError(f"{target_path} reads back sha256 {found}, not the image's {expected}: do not boot it")
    return FlashResult(image, target_path, size, expected, time.monotonic() - started)
