"""Facts about the node the agent runs on, read from /proc, /sys and /dev."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.agent.errors import AgentError
from appliance.agent.tools import find_program

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class KvmState:
    present: bool
    usable: bool
    detail: str


@dataclass(frozen=True)
class Bridge:
    """A Linux bridge on the node, as /sys/class/net shows it."""

    name: str
    vlan_filtering: bool
    ports: tuple[str, ...]
    mtu: int
    # On a VLAN-aware bridge: the VLANs each port (and the bridge itself) carries.
    vlans: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BondPort:
    """One NIC of a bond: its link as the bond's MII monitor sees it, and its own MAC (the
    bond gives every port its MAC while enslaved; this is the one the NIC came with)."""

    name: str
    link: str  # "up", "down" (or "going back" while the bond waits to trust it again)
    mac: str


@dataclass(frozen=True)
class Bond:
    """A Linux bond on the node, as /sys/class/net shows it."""

    name: str
    mode: str  # "active-backup", "802.3ad", ...
    ports: tuple[BondPort, ...]
    # The port carrying the traffic in active-backup mode; "" in other modes, or with no port up.
    active_port: str


@dataclass(frozen=True)
class HostReport:
    hostname: str
    kernel: str
    build_id: str
    cpu_model: str
    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    kvm: KvmState
    uptime_seconds: float
    # "persistent" (the data partition), "ram" (lost at shutdown), or "unknown" off an appliance.
    state_storage: str
    # The partition holding it when persistent, e.g. /dev/vda5 or a claimed disk's /dev/sdb1; else "".
    state_device: str
    agent_rss_bytes: int
    # Bridges guest NICs may name (those the tap helper allows are in the agent config).
    bridges: tuple[Bridge, ...] = ()
    # Bonds of NICs (a bridge's port, or the node's own interface), with each port's link.
    bonds: tuple[Bond, ...] = ()
    # Every interface's global addresses (CIDR), e.g. {"br0": ["192.0.2.10/24"]}.
    addresses: dict[str, list[str]] = field(default_factory=dict)
    # What appliance-network.service did at boot: "configured", "fallback", "no-link"; else "unknown".
    network: str = "unknown"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """Return /proc/meminfo as bytes per field."""
    fields: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        fields[name] = int(parts[0]) * scale
    return fields


def read_cpu_model(path: Path = Path("/proc/cpuinfo")) -> str:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def read_rss(path: Path = Path("/proc/self/status")) -> int:
    """Resident memory in bytes of the process `path` describes (by default the agent itself)."""
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == "VmRSS":
            parts = rest.split()
            return int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return 0


def read_uptime(path: Path = Path("/proc/uptime")) -> float:
    return float(path.read_text().split()[0])


def read_build_id(build_info_path: Path) -> str:
    """The build id from the image's build.json, or 'unknown' off an appliance."""
    try:
        info = json.loads(build_info_path.read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(info.get("build_id", "unknown"))


def probe_kvm(device: Path = Path("/dev/kvm")) -> KvmState:
    """Whether /dev/kvm opens and answers the KVM API version we speak."""
    if not device.exists():
        return KvmState(present=False, usable=False, detail=f"{device} does not exist")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return KvmState(present=True, usable=False, detail=f"cannot open {device}: {error.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as error:
        return KvmState(present=True, usable=False, detail=f"KVM_GET_API_VERSION failed: {error.strerror}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return KvmState(present=True, usable=False, detail=f"KVM API version {version}, want {KVM_API_VERSION}")
    return KvmState(present=True, usable=True, detail="KVM API version 12")


SYS_CLASS_NET = Path("/sys/class/net")


def read_sys_value(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def read_bridges(sys_class_net: Path = SYS_CLASS_NET) -> dict[str, Bridge]:
    """The node's bridges by name: every interface with a bridge/ directory."""
    bridges: dict[str, Bridge] = {}
    for bridge_dir in sorted(sys_class_net.glob("*/bridge")):
        interface = bridge_dir.parent
        ports = tuple(sorted(port.name for port in (interface / "brif").glob("*")))
        mtu = read_sys_value(interface / "mtu")
        vlan_filtering = read_sys_value(bridge_dir / "vlan_filtering") == "1"
        bridges[interface.name] = Bridge(
            name=interface.name,
            vlan_filtering=vlan_filtering,
            ports=ports,
            mtu=int(mtu) if mtu.isdigit() else 0,
            vlans=read_bridge_vlans(interface.name, ports) if vlan_filtering else {},
        )
    return bridges


def read_bonds(sys_class_net: Path = SYS_CLASS_NET) -> dict[str, Bond]:
    """The node's bonds by name: every interface with a bonding/ directory."""
    bonds: dict[str, Bond] = {}
    for bonding in sorted(sys_class_net.glob("*/bonding")):
        interface = bonding.parent
        ports = []
        for name in read_sys_value(bonding / "slaves").split():
            port = sys_class_net / name / "bonding_slave"
            ports.append(BondPort(name, read_sys_value(port / "mii_status"), read_sys_value(port / "perm_hwaddr")))
        bonds[interface.name] = Bond(
            name=interface.name,
            # The kernel writes the mode's name and number: "active-backup 1".
            mode=read_sys_value(bonding / "mode").split(" ")[0],
            ports=tuple(ports),
            active_port=read_sys_value(bonding / "active_slave"),
        )
    return bonds


def read_json_tool(argv: list[str], attempts: int = 3) -> Any:
    """The JSON a tool prints (ip -j, bridge -j); None when it is missing or fails: a report never fails on it.
    A dump fails when an interface goes away in the middle of it (a namespace's veths are removed by the
    kernel some time after the namespace), so a failed run is tried again."""
    try:
        # `bridge` is in /usr/sbin, which the agent's PATH (a plain user's, under SSH) lacks.
        program = find_program(argv[0], "iproute2")
    except AgentError:
        return None
    for _ in range(attempts):
        try:
            result = subprocess.run([program, *argv[1:]], capture_output=True, text=True, timeout=10, check=False)
            if result.returncode == 0 and result.stdout.strip():
                return json.loads(result.stdout)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return None


def read_bridge_vlans(bridge: str, ports: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    # -c: a trunk port's VLANs as ranges, not 4094 entries.
    shown = read_json_tool(["bridge", "-c", "-j", "vlan", "show"]) or []
    vlans: dict[str, tuple[int, ...]] = {}
    for entry in shown:
        name = entry.get("ifname")
        if name == bridge or name in ports:
            ids: list[int] = []
            for vlan in entry.get("vlans", []):
                first, last = vlan.get("vlan", 0), vlan.get("vlanEnd", vlan.get("vlan", 0))
                ids += range(first, last + 1) if last - first < 64 else [first, last]
            vlans[name] = tuple(ids)
    return vlans


def read_addresses() -> dict[str, list[str]]:
    """Global addresses by interface, as `ip -j addr` shows them (none on the loopback)."""
    shown = read_json_tool(["ip", "-j", "addr", "show", "scope", "global"]) or []
    return {
        entry["ifname"]: [f"{info['local']}/{info['prefixlen']}" for info in entry["addr_info"] if "local" in info]
        for entry in shown
        if entry.get("addr_info")
    }


NETWORK_MARKER = Path("/run/appliance/network")
STORAGE_MARKER = Path("/run/appliance/storage")
STORAGE_DEVICE_MARKER = Path("/run/appliance/storage-device")


def read_boot_marker(marker: Path) -> str:
    """What a boot-time service wrote into a /run file for the agent; "" if nothing."""
    try:
        return marker.read_text().strip()
    except OSError:
        return ""


def read_state_storage(marker: Path = STORAGE_MARKER) -> str:
    """Where the node keeps its state, as the boot's appliance-storage.service wrote it."""
    return read_boot_marker(marker) or "unknown"


def read_state_device(marker: Path = STORAGE_DEVICE_MARKER) -> str:
    """The partition appliance-storage.service mounted for the state; "" if none."""
    return read_boot_marker(marker)


def collect_report(build_info_path: Path) -> HostReport:
    memory = read_meminfo()
    return HostReport(
        hostname=socket.gethostname(),
        kernel=os.uname().release,
        build_id=read_build_id(build_info_path),
        cpu_model=read_cpu_model(),
        cpus=os.cpu_count() or 1,
        memory_total_bytes=memory.get("MemTotal", 0),
        memory_available_bytes=memory.get("MemAvailable", 0),
        kvm=probe_kvm(),
        uptime_seconds=read_uptime(),
        state_storage=read_state_storage(),
        state_device=read_state_device(),
        agent_rss_bytes=read_rss(),
        bridges=tuple(read_bridges().values()),
        bonds=tuple(read_bonds().values()),
        addresses=read_addresses(),
        network=read_boot_marker(NETWORK_MARKER) or "unknown",
    )
