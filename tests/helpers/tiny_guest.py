"""A tiny real guest for agent tests: a Debian kernel and a busybox initramfs the tests build.

The kernel is Debian's cloud flavour, fetched with `apt-get download` (the only
network these machines have) and cached between runs. The initramfs holds
busybox-static from the host, the virtio balloon driver (so a balloon change
is really carried out by the guest, not only requested) and acpid (so an ACPI
power-down really powers it off). It prints TINY_GUEST_MARKER on its serial
port and then every few seconds the memory it has, so tests can see the
balloon take effect.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_GUEST_MARKER = "TINY-GUEST-READY"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance-tests"

# Loaded in this order: each needs only those before it.
MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/virtio/virtio_balloon.ko",
    "drivers/input/evdev.ko",
    "drivers/acpi/button.ko",
)

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in /modules/*.ko; do insmod "$module"; done
acpid -d -c /etc/acpi &

echo "{TINY_GUEST_MARKER} $(nproc) cpus"
while true; do
    echo "memtotal-kib $(awk '/MemTotal/ {{print $2}}' /proc/meminfo)"
    sleep 2
done
"""

POWER_BUTTON = "#!/bin/sh\necho powering off\npoweroff -f\n"


@dataclass(frozen=True)
class TinyGuest:
    kernel: Path
    initrd: Path
    cmdline: str = "console=ttyS0 quiet panic=-1"


def current_kernel_package() -> str:
    """The versioned package linux-image-cloud-amd64 points at today (apt's lists read once more if stale)."""
    for attempt in range(2):
        depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True)
        lines = [line for line in depends.stdout.splitlines() if "Depends:" in line]
        if depends.returncode == 0 and lines:
            return lines[0].split(":", 1)[1].strip()
        if attempt == 0:
            # A machine whose apt lists were never fetched (or were cleaned) knows no kernel package.
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
    raise RuntimeError(f"apt knows no {KERNEL_PACKAGE}: {depends.stderr.strip()}")


def kernel_package_dir(cache: Path) -> Path:
    """The unpacked kernel package, fetched once into the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    versioned = current_kernel_package()
    unpacked = cache / versioned
    if unpacked.is_dir():
        return unpacked
    with tempfile.TemporaryDirectory(dir=cache) as download:
        # apt drops privileges to _apt for downloads; the directory must let it write.
        os.chmod(download, 0o777)
        subprocess.run(["apt-get", "download", "-q", versioned], cwd=download, check=True, capture_output=True)
        (deb,) = Path(download).glob("*.deb")
        staging = Path(download) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        staging.rename(unpacked)
    return unpacked


def build_tiny_guest(directory: Path, cache: Path = CACHE_DIR) -> TinyGuest:
    unpacked = kernel_package_dir(cache)
    (kernel,) = (unpacked / "boot").glob("vmlinuz-*")
    (modules_dir,) = (unpacked / "lib" / "modules").iterdir()
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox (busybox-static) is not installed: run `make deps`")
    tree = directory / "initramfs"
    for sub in ("bin", "modules", "etc/acpi/PWRF"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    for number, module in enumerate(MODULES):
        shutil.copy(modules_dir / "kernel" / module, tree / "modules" / f"{number:02d}-{Path(module).name}")
    (tree / "init").write_text(INIT)
    (tree / "etc" / "acpi" / "PWRF" / "00000080").write_text(POWER_BUTTON)
    for executable in (tree / "init", tree / "etc" / "acpi" / "PWRF" / "00000080", tree / "bin" / "busybox"):
        executable.chmod(executable.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    initrd = directory / "tiny-initrd.gz"
    names = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input="\n".join(names).encode(),
        cwd=tree,
        capture_output=True,
        check=True,
    ).stdout
    initrd.write_bytes(gzip.compress(cpio, compresslevel=1))
    target_kernel = directory / "tiny-vmlinuz"
    shutil.copy(kernel, target_kernel)
    return TinyGuest(kernel=target_kernel, initrd=initrd)
