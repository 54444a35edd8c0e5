"""8. Many operators at once: 32 SSH sessions for 30 s against agents behind loopback sshds.

Each session is one SSH connection (its own agent process, as on a node)
asking guest.list in a loop; meanwhile one more session reboots the running
guest again and again. Every reply must be an answer (errors counted) and
must show the guest running (a state mismatch otherwise). Not a pass/fail
test: the figures go to the table, next to nothing but themselves.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from figures import Section, percentile, seconds
from helpers.keys import make_key
from loopback import node_for, sshd_endpoints, write_known_hosts

from appliance.agent.accel import PROBE_BOOT_SECTOR
from appliance.errors import ApplianceError
from appliance.progress import Progress

TITLE = "8. load: concurrent SSH sessions listing guests while one reboots a guest (loopback sshds)"
GUEST_IMAGE = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")


@dataclass
class Tally:
    """What every session saw; one lock guards it."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: int = 0
    reboots: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def measure_load(work: Path, progress: Progress, sessions: int, duration: float, endpoints_count: int = 2) -> Section:
    section = Section("load", TITLE)
    key = make_key(work, "load-operator")
    image = work / "load-guest.img"
    image.write_bytes(GUEST_IMAGE)
    with sshd_endpoints(work / "load", endpoints_count, key.with_suffix(".pub").read_text().strip()) as endpoints:
        known_hosts = write_known_hosts(endpoints, work / "load" / "known_hosts")
        for endpoint in endpoints:
            with node_for(endpoint, key, known_hosts) as node:
                node.push_image(image, "marker")
                node.call("guest.create", {"name": "busy", "memory_mib": 32, "disks": [{"base_image": "marker"}]})
                node.call("guest.start", {"name": "busy"})
        tally = Tally()
        stop = threading.Event()

        def lister(index: int) -> None:
            try:
                with node_for(endpoints[index % len(endpoints)], key, known_hosts) as node:
                    while not stop.is_set():
                        started = time.perf_counter()
                        listed = node.call("guest.list")
                        elapsed = time.perf_counter() - started
                        with tally.lock:
                            tally.latencies.append(elapsed)
                            tally.mismatches += sum(1 for guest in listed if guest["state"] != "running")
            except ApplianceError as error:
                with tally.lock:
                    tally.errors.append(str(error))

        def rebooter() -> None:
            try:
                with node_for(endpoints[0], key, known_hosts) as node:
                    while not stop.is_set():
                        node.call("guest.reboot", {"name": "busy"})
                        with tally.lock:
                            tally.reboots += 1
            except ApplianceError as error:
                with tally.lock:
                    tally.errors.append(f"reboot: {error}")

        threads = [threading.Thread(target=lister, args=(index,)) for index in range(sessions)]
        threads.append(threading.Thread(target=rebooter))
        with progress.step(f"{sessions} sessions listing for {duration:.0f}s, one rebooting, {len(endpoints)} nodes"):
            for thread in threads:
                thread.start()
            stop.wait(duration)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        for endpoint in endpoints:
            with node_for(endpoint, key, known_hosts) as node:
                node.call("guest.kill", {"name": "busy"})
    requests = len(tally.latencies)
    section.add("requests per second", f"{requests / duration:.1f}", f"{requests} guest.list in {duration:.0f}s")
    if requests:
        for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            section.add(f"guest.list latency {name}", seconds(percentile(tally.latencies, fraction)))
    section.add("errors", str(len(tally.errors)), tally.errors[0][:60] if tally.errors else "")
    section.add("state mismatches (running guest not shown running)", str(tally.mismatches))
    section.add("reboots done meanwhile", str(tally.reboots))
    section.data = {
        "sessions": sessions,
        "seconds": duration,
        "nodes": len(endpoints),
        "requests": requests,
        "errors": tally.errors[:20],
        "mismatches": tally.mismatches,
        "reboots": tally.reboots,
        "latency": {name: percentile(tally.latencies, f) for name, f in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
        if requests
        else {},
    }
    return section
