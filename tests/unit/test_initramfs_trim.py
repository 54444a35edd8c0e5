"""The initramfs hook that leaves unneeded module trees out, run on a laid-out tree.

mkinitramfs calls it with DESTDIR and MODULESDIR set; here DESTDIR is a
directory of empty module files and TRIM_MODULES_DEP a modules.dep written
for it, in the kernel's own format.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from appliance.build.layout import ELEMENTS_DIR

HOOK = ELEMENTS_DIR / "appliance-live/static/etc/initramfs-tools/hooks/appliance-trim-modules"
MODULES = {
    "kernel/fs/ext4/ext4.ko.xz": "",
    "kernel/fs/btrfs/btrfs.ko.xz": "",
    "kernel/fs/nfs/nfsv4.ko.xz": "kernel/fs/lockd/lockd.ko.xz kernel/net/sunrpc/sunrpc.ko.xz",
    "kernel/fs/lockd/lockd.ko.xz": "kernel/net/sunrpc/sunrpc.ko.xz kernel/fs/nfs_common/grace.ko.xz",
    "kernel/fs/nfs_common/grace.ko.xz": "",
    "kernel/net/sunrpc/sunrpc.ko.xz": "",
    "kernel/drivers/block/rbd.ko.xz": "kernel/net/ceph/libceph.ko.xz",
    "kernel/net/ceph/libceph.ko.xz": "",
}


def test_unneeded_trees_go_and_a_tree_a_kept_module_needs_stays(tmp_path: Path) -> None:
    modules_dir = "/lib/modules/6.12.0-test"
    root = tmp_path / "initramfs"
    for module in MODULES:
        path = root / modules_dir.lstrip("/") / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    dep_file = tmp_path / "modules.dep"
    dep_file.write_text("".join(f"{module}: {deps}\n" for module, deps in MODULES.items()))
    env = {"PATH": "/usr/bin:/bin", "DESTDIR": str(root), "MODULESDIR": modules_dir, "TRIM_MODULES_DEP": str(dep_file)}
    result = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, check=True)
    left = sorted(str(path.relative_to(root / modules_dir.lstrip("/"))) for path in root.rglob("*.ko.xz"))
    # rbd (a block driver, kept) needs libceph: net/ceph stays, and the hook says why.
    assert left == ["kernel/drivers/block/rbd.ko.xz", "kernel/fs/ext4/ext4.ko.xz", "kernel/net/ceph/libceph.ko.xz"]
    assert "keeping kernel/net/ceph: kernel/drivers/block/rbd.ko.xz needs it" in result.stderr
    assert subprocess.run([str(HOOK), "prereqs"], capture_output=True, text=True, check=True).stdout.strip() == ""
