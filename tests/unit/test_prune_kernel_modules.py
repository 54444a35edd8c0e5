"""prune-kernel-modules, which trims the root's module tree (appliance-base) and the initramfs's
(appliance-live), run on a laid-out tree: a directory of empty module files and a modules.dep
written for it in the kernel's own format (every dependency listed, as depmod writes it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from appliance.build.layout import ELEMENTS_DIR

PRUNE = ELEMENTS_DIR / "appliance-base/static/usr/lib/appliance/prune-kernel-modules"
HOOK = ELEMENTS_DIR / "appliance-live/static/etc/initramfs-tools/hooks/appliance-initramfs-modules"
MODULES = {
    "kernel/fs/ext4/ext4.ko.xz": "kernel/fs/jbd2/jbd2.ko.xz",
    "kernel/fs/jbd2/jbd2.ko.xz": "",
    "kernel/fs/btrfs/btrfs.ko.xz": "",
    "kernel/fs/nfs/nfsv4.ko.xz": "kernel/fs/lockd/lockd.ko.xz kernel/net/sunrpc/sunrpc.ko.xz",
    "kernel/fs/lockd/lockd.ko.xz": "kernel/net/sunrpc/sunrpc.ko.xz kernel/fs/nfs_common/grace.ko.xz",
    "kernel/fs/nfs_common/grace.ko.xz": "",
    "kernel/net/sunrpc/sunrpc.ko.xz": "",
    "kernel/drivers/block/rbd.ko.xz": "kernel/net/ceph/libceph.ko.xz",
    "kernel/net/ceph/libceph.ko.xz": "",
    "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz": "",
}


def lay_out(tmp_path: Path) -> tuple[Path, Path]:
    modules_dir = tmp_path / "lib/modules/6.12.0-test"
    for module in MODULES:
        path = modules_dir / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    dep_file = tmp_path / "modules.dep"
    dep_file.write_text("".join(f"{module}: {deps}\n" for module, deps in MODULES.items()))
    return modules_dir, dep_file


def prune(mode: str, dep_file: Path, modules_dir: Path, *names: str) -> str:
    result = subprocess.run(
        [str(PRUNE), mode, str(dep_file), str(modules_dir), *names], capture_output=True, text=True, check=True
    )
    return result.stderr


def left(modules_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(modules_dir)) for path in modules_dir.rglob("*.ko.xz"))


def test_unneeded_trees_go_and_a_tree_a_kept_module_needs_stays(tmp_path: Path) -> None:
    modules_dir, dep_file = lay_out(tmp_path)
    said = prune("drop", dep_file, modules_dir, "fs/btrfs", "fs/nfs", "fs/lockd", "fs/nfs_common", "net/sunrpc",
                 "net/ceph", "drivers/net")  # fmt: skip
    # rbd (a block driver, kept) needs libceph: it stays, and the tool says why.
    assert left(modules_dir) == [
        "kernel/drivers/block/rbd.ko.xz",
        "kernel/fs/ext4/ext4.ko.xz",
        "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/net/ceph/libceph.ko.xz",
    ]
    assert "keeping kernel/net/ceph/libceph.ko.xz: kernel/drivers/block/rbd.ko.xz needs it" in said
    assert "6 of 10 modules removed" in said
    assert not (modules_dir / "kernel/fs/btrfs").exists()  # emptied directories go too


def test_the_initramfs_keeps_the_listed_modules_and_what_they_need(tmp_path: Path) -> None:
    modules_dir, dep_file = lay_out(tmp_path)
    # Names as modprobe takes them: a dash and an underscore are the same.
    prune("keep", dep_file, modules_dir, "ext4", "e1000e", "lockd", "no_such_module")
    assert left(modules_dir) == [
        "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz",
        "kernel/fs/ext4/ext4.ko.xz",
        "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/fs/lockd/lockd.ko.xz",
        "kernel/fs/nfs_common/grace.ko.xz",
        "kernel/net/sunrpc/sunrpc.ko.xz",
    ]


def test_the_initramfs_hook_names_no_prerequisites() -> None:
    assert subprocess.run([str(HOOK), "prereqs"], capture_output=True, text=True, check=True).stdout.strip() == ""
