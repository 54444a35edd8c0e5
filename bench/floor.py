"""0. The floor: what the same kernel costs with nothing on top, measured in the same run as the appliance.

The guest is the tests' tiny guest (tests/helpers/tiny_guest.py): Debian's
kernel and a busybox initramfs. Its init prints the memory in use
(MemTotal - MemAvailable, as host.report counts it for the node) before its
marker, so one boot gives the floor of both the boot time and the memory. It
boots with the machine, accelerator, memory and vCPUs the appliance boots
with; the firmware loads it directly (-kernel), so the floor holds no boot
loader. Its build is the floor of a build: the kernel package fetched and
unpacked (cold) or from the cache (warm), and an initramfs packed.
"""

from __future__ import annotations

import gzip
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from figures import Section, median_text, summary
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest

from appliance.agent.accel import AccelChoice
from appliance.agent.qemu import QemuFiles, base_argv
from appliance.progress import Progress

TITLE = "0. floor: Debian's kernel + a busybox initramfs (tests/helpers/tiny_guest.py), same QEMU settings"
MEMORY_LINE = "FLOOR-MEMORY-USED-KIB"
MARKER_TIMEOUT = 300.0
# The tiny guest's init, less what the floor needs not (its seed, network and balloon extras):
# the memory line comes first, then the marker, as the node's agent-ready comes after its services.
FLOOR_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "{MEMORY_LINE} $(awk '/^MemTotal:/ {{t = $2}} /^MemAvailable:/ {{a = $2}} END {{print t - a}}' /proc/meminfo)"
echo "{TINY_GUEST_MARKER} $(nproc) cpus"
while true; do sleep 60; done
"""


@dataclass(frozen=True)
class Floor:
    """The floor figures every target row is set against."""

    boot_seconds: float  # median, QEMU start -> marker
    memory_used_bytes: int  # median
    kernel_bytes: int
    initrd_bytes: int
    build_cold_seconds: float
    build_warm_seconds: float

    @property
    def media_bytes(self) -> int:
        """What a medium must carry to boot it: the kernel and the initramfs."""
        return self.kernel_bytes + self.initrd_bytes


def floor_initrd(guest_dir: Path) -> Path:
    """The tiny guest's initramfs tree (build_tiny_guest leaves it in GUEST_DIR/initramfs) with FLOOR_INIT."""
    tree = guest_dir / "initramfs"
    (tree / "init").write_text(FLOOR_INIT)
    names = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input="\n".join(names).encode(),
        cwd=tree,
        capture_output=True,
        check=True,
    ).stdout
    initrd = guest_dir / "floor-initrd.gz"
    initrd.write_bytes(gzip.compress(cpio, compresslevel=9))
    return initrd


def boot_floor_once(guest: TinyGuest, initrd: Path, accel: AccelChoice, memory_mb: int, cpus: int,
                    work: Path) -> tuple[float, int]:  # fmt: skip
    """Seconds from QEMU start to the marker, and the guest's memory in use in bytes."""
    files = QemuFiles(work / "floor-run")
    files.directory.mkdir(parents=True, exist_ok=True)
    files.console_log.unlink(missing_ok=True)
    argv = [*base_argv("floor", accel, memory_mb, cpus, files), "-kernel", str(guest.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1"]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < MARKER_TIMEOUT:
            console = files.console_log.read_text(errors="replace") if files.console_log.exists() else ""
            if TINY_GUEST_MARKER in console:
                seconds = time.monotonic() - started
                found = re.search(rf"{MEMORY_LINE} (\d+)", console)
                if found is None:
                    raise RuntimeError(f"the floor guest printed no {MEMORY_LINE} line: {console[-300:]!r}")
                return seconds, int(found.group(1)) * 1024
            if process.poll() is not None:
                raise RuntimeError(f"QEMU exited with {process.returncode} before the floor guest's marker")
            time.sleep(0.05)
        raise TimeoutError(f"no {TINY_GUEST_MARKER} from the floor guest within {MARKER_TIMEOUT:.0f}s")
    finally:
        process.kill()
        process.wait()


def timed_guest_build(directory: Path, cache: Path | None) -> float:
    started = time.monotonic()
    if cache is None:
        build_tiny_guest(directory)
    else:
        build_tiny_guest(directory, cache)
    return time.monotonic() - started


def measure_floor(work: Path, progress: Progress, accel: AccelChoice, memory_mb: int, cpus: int,
                  runs: int) -> tuple[Section, Floor]:  # fmt: skip
    section = Section("floor", TITLE)
    with progress.step("build the floor guest: cold (kernel package fetched into an empty cache), then warm"):
        with tempfile.TemporaryDirectory(prefix="floor-cache-", dir=work) as cold_cache:
            cold = timed_guest_build(work / "floor-cold", Path(cold_cache))
        shutil.rmtree(work / "floor-cold", ignore_errors=True)
        warm = timed_guest_build(work / "floor-guest", None)
    guest = build_tiny_guest(work / "floor-guest")
    initrd = floor_initrd(work / "floor-guest")
    boots: list[float] = []
    memory: list[int] = []
    with progress.step(f"boot the floor guest {runs} times ({accel.accel}, {memory_mb} MB, {cpus} vCPUs)"):
        for _ in range(runs):
            seconds, used = boot_floor_once(guest, initrd, accel, memory_mb, cpus, work)
            boots.append(seconds)
            memory.append(used)
    floor = Floor(
        boot_seconds=statistics.median(boots),
        memory_used_bytes=int(statistics.median(memory)),
        kernel_bytes=guest.kernel.stat().st_size,
        initrd_bytes=initrd.stat().st_size,
        build_cold_seconds=cold,
        build_warm_seconds=warm,
    )
    section.add("QEMU start -> marker", median_text(boots), "the floor of both boot rows")
    section.add("memory in use at the marker", f"{floor.memory_used_bytes / (1 << 20):.1f} MiB",
                "MemTotal - MemAvailable, median")  # fmt: skip
    section.add("kernel + initramfs", f"{floor.media_bytes / 1e6:.1f} MB",
                f"kernel {floor.kernel_bytes / 1e6:.1f} MB, initramfs {floor.initrd_bytes / 1e6:.1f} MB")  # fmt: skip
    section.add("build, cold (kernel package fetched)", median_text([cold]))
    section.add("build, warm (kernel package cached)", median_text([warm]))
    section.data = {
        "boot_seconds": summary(boots),
        "memory_used_bytes": memory,
        "kernel_bytes": floor.kernel_bytes,
        "initrd_bytes": floor.initrd_bytes,
        "build_cold_seconds": cold,
        "build_warm_seconds": warm,
        "accel": accel.accel,
        "memory_mb": memory_mb,
        "cpus": cpus,
    }
    return section, floor
