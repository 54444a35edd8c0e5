"""The issue's table (a lean node and fast rebuilds): each figure, its floor from the same run, the
ratio between them, and the target. Read from the other sections' data; measures nothing itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from figures import MIB, Section, seconds
from floor import Floor

TITLE = "9. targets: each figure against its floor (section 0, this run) and the issue's target"


@dataclass(frozen=True)
class Target:
    figure: str
    unit: str  # "s", "MiB" or "MB"
    limit: float  # the figure must not exceed it
    floor: Callable[[Floor], float]
    floor_what: str
    find: Callable[[dict[str, Section]], float | None]  # the figure, None when not measured
    ratio_limit: float | None = None  # also at most this many times the floor


def _data(sections: dict[str, Section], key: str) -> dict[str, Any]:
    section = sections.get(key)
    return section.data if section is not None and section.status == "measured" else {}


def boot_figure(media: str) -> Callable[[dict[str, Section]], float | None]:
    def find(sections: dict[str, Section]) -> float | None:
        entry = _data(sections, "boot").get(media)
        return float(entry["agent_ready"]["median"]) if entry else None

    return find


def memory_figure(media: str) -> Callable[[dict[str, Section]], float | None]:
    def find(sections: dict[str, Section]) -> float | None:
        used = _data(sections, "memory").get(media, {}).get("memory_used_bytes")
        return sorted(used)[len(used) // 2] / MIB if used else None

    return find


def artifact_figure(suffix: str) -> Callable[[dict[str, Section]], float | None]:
    def find(sections: dict[str, Section]) -> float | None:
        for entry in _data(sections, "sizes").get("artifacts", []):
            if str(entry["file"]).endswith(suffix):
                return int(entry["size_bytes"]) / 1e6
        return None

    return find


def build_figure(kind: str) -> Callable[[dict[str, Section]], float | None]:
    def find(sections: dict[str, Section]) -> float | None:
        entry = _data(sections, "builds").get(kind)
        return float(entry["median"]) if entry else None

    return find


TARGETS = (
    Target("QEMU start -> agent-ready, ISO", "s", 35.0, lambda f: f.boot_seconds, "kernel+busybox boot",
           boot_figure("iso"), ratio_limit=5.0),
    Target("QEMU start -> agent-ready, disk image", "s", 30.0, lambda f: f.boot_seconds, "kernel+busybox boot",
           boot_figure("disk")),
    Target("memory in use after boot, ISO", "MiB", 180.0, lambda f: f.memory_used_bytes / MIB,
           "kernel+busybox guest", memory_figure("iso")),
    Target("memory in use after boot, disk image", "MiB", 180.0, lambda f: f.memory_used_bytes / MIB,
           "kernel+busybox guest", memory_figure("disk")),
    Target("ISO", "MB", 120.0, lambda f: f.media_bytes / 1e6, "kernel + busybox initramfs", artifact_figure(".iso")),
    Target("initrd", "MB", 12.0, lambda f: f.initrd_bytes / 1e6, "busybox initramfs", artifact_figure(".initrd")),
    Target("rebuild, unchanged spec and package set", "s", 10.0, lambda f: f.build_warm_seconds,
           "busybox guest build, warm", build_figure("rebuild")),
    Target("rebuild after a new host name", "s", 45.0, lambda f: f.build_warm_seconds,
           "busybox guest build, warm", build_figure("changed_config")),
    Target("cold build", "s", 240.0, lambda f: f.build_cold_seconds, "busybox guest build, cold",
           build_figure("cold")),
)  # fmt: skip


def shown(value: float, unit: str) -> str:
    return seconds(value) if unit == "s" else f"{value:.1f} {unit}"


def target_rows(sections: dict[str, Section], floor: Floor | None) -> Section:
    section = Section("targets", TITLE)
    if floor is None:
        section.reason = "no floor measured (section 0 skipped or failed): ratios are missing"
    rows = []
    for target in TARGETS:
        value = target.find(sections)
        row: dict[str, Any] = {"figure": target.figure, "unit": target.unit, "target": target.limit, "value": value}
        wanted = f"target <= {shown(target.limit, target.unit)}"
        if target.ratio_limit is not None:
            wanted += f" and <= {target.ratio_limit:g}x the floor"
        if value is None:
            section.add(target.figure, "not measured", wanted)
            rows.append(row)
            continue
        met = value <= target.limit
        note = ""
        if floor is not None:
            floor_value = target.floor(floor)
            ratio = value / floor_value if floor_value else float("inf")
            row.update({"floor": floor_value, "floor_is": target.floor_what, "ratio": round(ratio, 2)})
            note = f"floor {shown(floor_value, target.unit)} ({target.floor_what}), {ratio:.1f}x; "
            if target.ratio_limit is not None:
                met = met and ratio <= target.ratio_limit
        row["met"] = met
        section.add(target.figure, shown(value, target.unit), note + wanted + (": met" if met else ": NOT met"))
        rows.append(row)
    section.data = {"rows": rows}
    return section
