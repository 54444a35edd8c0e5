"""A tiny real guest for agent tests: a Debian kernel and a busybox initramfs the tests build.

The kernel is Debian's cloud flavour, fetched with `apt-get download` (the only
network these machines have) and cached between runs. The initramfs holds
busybox-static from the host, the virtio balloon driver (so a balloon change
is really carried out by the guest, not only requested) and acpid (so an ACPI
power-down really powers it off). It prints TINY_GUEST_MARKER on its serial
port and then every few seconds the memory it has, so tests can see the
balloon take effect, and the size of each virtio disk it sees
(`tiny-disk vda SECTORS`, from /sys/block), so they can see a disk grow.
A shell reads the serial console (commands typed into an attached console
are run, their output comes back on it).

Beside that, in the background, so the marker comes as early as before:
- a volume labelled `cidata` (a NoCloud seed) is mounted; the guest takes the
  seed's host name and prints `tiny-seed hostname=NAME` and one
  `tiny-seed key=KEY` per SSH key in its user-data;
- a NIC (virtio_net) takes an address by DHCP (busybox udhcpc) and prints
  `tiny-address IFACE ADDRESS`;
- `tiny.serve=PORT` on the kernel command line answers every TCP connection
  on PORT with `tiny-hello from NAME`, printing `tiny-served` on the console;
  `tiny.connect=HOST:PORT` connects until it gets an answer and prints it as
  `tiny-got ANSWER`; `tiny.probe=HOST:PORT` tries once a second and prints
  `tiny-probe HOST:PORT open` or `... closed` each time;
- `tiny.counter` prints `tiny-count N` every second, N from 1 (a guest that
  moved without a reboot counts on); `tiny.counter=vda` also writes that line
  to the disk's sector 2048 (at 1 MiB) each time, synced.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_GUEST_MARKER = "TINY-GUEST-READY"
# A line of `tiny.counter`, whole: one still being written is not read yet (its number may be cut short).
COUNT_LINE = re.compile(r"^tiny-count (\d+)\r?\n", re.MULTILINE)
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
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/block/virtio_blk.ko",
    "fs/fat/fat.ko",
    "fs/fat/vfat.ko",
    "fs/nls/nls_cp437.ko",
    "fs/nls/nls_ascii.ko",
)

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in /modules/*.ko; do insmod "$module"; done
acpid -d -c /etc/acpi &
# The marker only once acpid holds the power button's input device: a power-down asked as soon as the
# marker shows (the tests do) must not come before anyone listens for it.
acpid_pid=$!
for try in $(seq 1 100); do
    ls -l /proc/$acpid_pid/fd 2>/dev/null | grep -q /dev/input/ && break
    sleep 0.1
done

echo "{TINY_GUEST_MARKER} $(nproc) cpus"
/bin/tiny-extras &
# A shell on the serial console for whoever attaches to it (a new one if it is left).
(while true; do setsid sh </dev/ttyS0 >/dev/ttyS0 2>&1; done) &
while true; do
    echo "memtotal-kib $(awk '/MemTotal/ {{print $2}}' /proc/meminfo)"
    for disk in /sys/block/vd*; do
        [ -e "$disk/size" ] && echo "tiny-disk ${{disk##*/}} $(cat "$disk/size")"
    done
    sleep 2
done
"""

POWER_BUTTON = "#!/bin/sh\necho powering off\npoweroff -f\n"

# The seed, the network and the roles the kernel command line asks for (see the module's docstring).
EXTRAS = r"""#!/bin/sh
for word in $(cat /proc/cmdline); do
    case "$word" in
    tiny.counter|tiny.counter=*)
        disk="${word#tiny.counter}"
        disk="${disk#=}"
        (count=0
         while true; do
            count=$((count + 1))
            echo "tiny-count $count"
            [ -n "$disk" ] && echo "tiny-count $count" |
                dd of="/dev/$disk" bs=512 seek=2048 conv=notrunc,sync,fsync 2>/dev/null
            sleep 1
         done) &
        ;;
    esac
done
mkdir -p /mnt/seed
seed=$(findfs LABEL=cidata 2>/dev/null)
if [ -n "$seed" ] && mount -t vfat -o ro "$seed" /mnt/seed; then
    name=$(sed -n 's/^local-hostname: *//p' /mnt/seed/meta-data)
    [ -n "$name" ] && hostname "$name"
    echo "tiny-seed hostname=$(hostname)"
    grep -o 'ssh-[a-z0-9-]* [A-Za-z0-9+/=]*' /mnt/seed/user-data | while read -r key; do
        echo "tiny-seed key=$key"
    done
fi
ip link set lo up
[ -e /sys/class/net/eth0 ] || exit 0
ip link set eth0 up
until udhcpc -i eth0 -s /bin/tiny-dhcp -q -n -t 5 -T 2 >/dev/null 2>&1; do sleep 1; done
for word in $(cat /proc/cmdline); do
    case "$word" in
    tiny.serve=*)
        nc -ll -p "${word#tiny.serve=}" -e /bin/tiny-answer &
        ;;
    tiny.connect=*)
        target="${word#tiny.connect=}"
        (until answer=$(timeout 5 nc -w 3 "${target%:*}" "${target#*:}" </dev/null) && [ -n "$answer" ]; do
            sleep 1
         done
         echo "tiny-got $answer") &
        ;;
    tiny.probe=*)
        target="${word#tiny.probe=}"
        (while true; do
            if timeout 3 nc -w 2 "${target%:*}" "${target#*:}" </dev/null >/dev/null 2>&1; then
                state=open
            else
                state=closed
            fi
            echo "tiny-probe $target $state"
            sleep 1
        done) &
        ;;
    esac
done
"""

# udhcpc's hook: configure what the lease gave and say so.
DHCP_SCRIPT = r"""#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "tiny-address $interface $ip" > /dev/console
    ;;
esac
"""

# Run by nc for each connection on tiny.serve's port: stdout goes to the peer.
ANSWER = """#!/bin/sh
echo "tiny-hello from $(hostname)"
echo "tiny-served" > /dev/console
"""


def tiny_counts(console: str) -> list[int]:
    """The numbers `tiny.counter` printed on a console, in order."""
    return [int(number) for number in COUNT_LINE.findall(console)]


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
    scripts = {
        tree / "init": INIT,
        tree / "etc" / "acpi" / "PWRF" / "00000080": POWER_BUTTON,
        tree / "bin" / "tiny-extras": EXTRAS,
        tree / "bin" / "tiny-dhcp": DHCP_SCRIPT,
        tree / "bin" / "tiny-answer": ANSWER,
    }
    for path, text in scripts.items():
        path.write_text(text)
    for executable in (*scripts, tree / "bin" / "busybox"):
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
