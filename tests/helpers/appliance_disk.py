"""A small appliance disk in a file, laid out as the packer lays out NAME.raw, and the node's view of it.

Slots of a few MiB hold stand-in builds (random bytes for kernel, initrd and
squashfs): what the lifecycle code reads and writes is partitions, ext4 file
systems, grubenv and files, not what the files mean. `LifecycleNode` is the
configuration a node's lifecycle code is given (lifecycle.toml): its boot disk
is the file, its data partition a directory, its running build a build.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.agent.disklayout import (
    BOOT_CFG_FILE,
    BUILD_INFO_FILE,
    ESP_LABEL,
    GRUBENV_SLOT,
    GRUBENV_TRIAL,
    LIVE_FILES,
    SLOT_LABELS,
    DiskLayout,
    MiB,
    boot_cfg,
    build_info,
    build_info_text,
    esp_serial,
    plan_layout,
    sfdisk_script,
)

MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
NAME = "appliance"
CMDLINE = "boot=live toram=filesystem.squashfs console=ttyS0,115200n8 quiet"


@dataclass(frozen=True)
class StandIn:
    """A build's live files (random bytes) and how the client describes it to upgrade.prepare."""

    build_id: str
    files: dict[str, Path]
    name: str = NAME
    arch: str = "amd64"
    cmdline: str = CMDLINE

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "build_id": self.build_id,
            "arch": self.arch,
            "kernel_cmdline": self.cmdline,
            "files": {
                name: {"size_bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                for name, path in self.files.items()
            },
        }


def stand_in_build(
    directory: Path, build_id: str, sizes: tuple[int, int, int] = (300_000, 500_000, 1_500_000)
) -> StandIn:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, size in zip(LIVE_FILES, sizes, strict=True):
        path = directory / name
        path.write_bytes(os.urandom(size))
        files[name] = path
    return StandIn(build_id, files)


def make_disk(path: Path, build: StandIn, slot_mib: int = 8) -> DiskLayout:
    """The disk image of BUILD: GPT, ESP with grubenv (slot a), slot A holding the build, slot B empty."""
    layout = plan_layout(slot_mib * MiB, build.build_id, data_bytes=8 * MiB)
    with path.open("wb") as stream:
        stream.truncate(layout.size)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
                   input=sfdisk_script(layout, NAME).encode(), check=True, capture_output=True)  # fmt: skip
    esp = layout.partition("esp")
    subprocess.run(["mkfs.vfat", "--offset", str(esp.start_lba), "-F", "32", "-s", "1", "-n", ESP_LABEL,
                    "-i", esp_serial(build.build_id), str(path), str(esp.size // 1024)],
                   check=True, capture_output=True)  # fmt: skip
    env_file = path.with_name("grubenv")
    subprocess.run(["grub-editenv", str(env_file), "create"], check=True)
    subprocess.run(["grub-editenv", str(env_file), "set", f"{GRUBENV_SLOT}=a", f"{GRUBENV_TRIAL}="], check=True)
    target = f"{path}@@{esp.start}"
    subprocess.run(["mmd", "-i", target, "::/grub"], check=True, env=MTOOLS)
    subprocess.run(["mcopy", "-i", target, str(env_file), "::/grub/grubenv"], check=True, env=MTOOLS)
    tree = path.with_name("slot-a-tree")
    live = tree / "live"
    live.mkdir(parents=True)
    for name, source in build.files.items():
        os.link(source, live / name)
    (live / BOOT_CFG_FILE).write_text(boot_cfg(build.cmdline, build.build_id))
    described = build.describe()["files"]
    files = {name: (entry["size_bytes"], entry["sha256"]) for name, entry in described.items()}
    (live / BUILD_INFO_FILE).write_text(build_info_text(build_info(NAME, build.build_id, "amd64", CMDLINE, files)))
    for label, content in ((SLOT_LABELS[0], tree), (SLOT_LABELS[1], None)):
        slot = layout.partition(label)
        argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-E", f"offset={slot.start}"]
        argv += ["-d", str(content)] if content else []
        subprocess.run([*argv, str(path), f"{slot.size // 1024}k"], check=True)
    return layout


def slot_file(disk: Path, layout: DiskLayout, label: str, name: str) -> bytes:
    """A file inside a slot's ext4, read with debugfs (no mount)."""
    slot = layout.partition(label)
    done = subprocess.run(["debugfs", "-R", f"cat /live/{name}", f"{disk}?offset={slot.start}"],
                          capture_output=True, check=True)  # fmt: skip
    return done.stdout


def grubenv(disk: Path, layout: DiskLayout) -> dict[str, str]:
    """grubenv as grub-editenv reads it."""
    esp = layout.partition("esp")
    copy = disk.with_name("grubenv-read")
    subprocess.run(["mcopy", "-o", "-n", "-i", f"{disk}@@{esp.start}", "::/grub/grubenv", str(copy)],
                   check=True, env=MTOOLS)  # fmt: skip
    listed = subprocess.run(["grub-editenv", str(copy), "list"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in listed.splitlines())


@dataclass(frozen=True)
class LifecycleNode:
    """A node's lifecycle configuration over a disk file: what lifecycle.toml would say on it."""

    root: Path
    disk: Path
    booted: str = "a"
    build_id: str = ""
    health_timeout: int = 180

    @property
    def config_file(self) -> Path:
        return self.root / "lifecycle.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def status_file(self) -> Path:
        return self.root / "run" / "lifecycle.json"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "helper.sock"

    @property
    def storage_marker(self) -> Path:
        return self.root / "run" / "storage"

    def write(self) -> Path:
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage_marker.write_text("persistent\n")
        (self.root / "build.json").write_text(json.dumps({"name": NAME, "build_id": self.build_id}))
        self.config_file.write_text(
            f"[upgrade]\nhealth_checks = []\nhealth_timeout = {self.health_timeout}\n"
            f'[node]\nboot_disk = "{self.disk}"\nbooted_slot = "{self.booted}"\ndata_dir = "{self.data_dir}"\n'
            f'status_file = "{self.status_file}"\nstorage_marker = "{self.storage_marker}"\n'
            f'build_info = "{self.root / "build.json"}"\nstate_dir = "{self.root / "state"}"\n'
            f'firstboot_file = "{self.root / "run" / "firstboot.json"}"\n'
            f'[helper]\nsocket = "{self.socket}"\n'
        )
        return self.config_file

    def booted_into(self, slot: str, build_id: str) -> LifecycleNode:
        """The same node after a reboot into SLOT running BUILD_ID."""
        node = LifecycleNode(self.root, self.disk, slot, build_id, self.health_timeout)
        node.write()
        return node
