#!/usr/bin/env python3
"""`make bench`: where the appliance stands, in figures, on this machine. Never a pass/fail test.

Prints a table and writes the same figures as JSON. Every section can be skipped
(--skip builds,boot,libvirt ...); a section that fails is reported as failed,
with its error, and the others still run.

usage: bench/bench.py [--skip SECTIONS] [--build-dir DIR --key PRIVATE_KEY] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# The test helpers (a loopback sshd, the agent on pipes, the tiny guest) serve the bench as they are.
sys.path.insert(1, str(REPO / "tests"))

from boots import CPUS, MEMORY_MB, TITLE_BOOT, TITLE_MEMORY, measure_boots  # noqa: E402
from bridged_start import TITLE as BRIDGED_TITLE  # noqa: E402
from bridged_start import measure_bridged_start  # noqa: E402
from builds import TITLE_BUILDS, TITLE_SIZES, measure_builds, measure_sizes  # noqa: E402
from figures import Section  # noqa: E402
from floor import TITLE as FLOOR_TITLE  # noqa: E402
from floor import Floor, measure_floor  # noqa: E402
from guest_start import TITLE as GUESTS_TITLE  # noqa: E402
from guest_start import measure_guest_starts  # noqa: E402
from helpers.tiny_guest import build_tiny_guest  # noqa: E402
from load import TITLE as LOAD_TITLE  # noqa: E402
from load import measure_load  # noqa: E402
from loopback import measure_fleet, measure_loopback  # noqa: E402
from machine import Machine, describe_machine, load_average  # noqa: E402
from migration import TITLE as MIGRATION_TITLE  # noqa: E402
from migration import measure_migrations  # noqa: E402
from round_trips import RoundTrips  # noqa: E402
from targets import target_rows  # noqa: E402

from appliance.agent.accel import AccelChoice  # noqa: E402
from appliance.build.dib import DEFAULT_CACHE_DIR  # noqa: E402
from appliance.progress import Progress  # noqa: E402

SECTIONS = (
    "floor", "sizes", "builds", "boot", "roundtrip", "guests", "libvirt", "bridged", "fleet", "load", "migration",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench/bench.py"
    )
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip, of: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default: bench/results/bench-DATE.json)")
    parser.add_argument("--build-dir", type=Path, help="measure this existing build instead of building")
    parser.add_argument("--key", type=Path, help="operator private key of --build-dir's build")
    parser.add_argument("--work-dir", type=Path, help="scratch space (default: a new directory in /var/tmp)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch space (builds, logs) afterwards")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="the warm builds' cache (default: %(default)s)")  # fmt: skip
    parser.add_argument("--build-runs", type=int, default=1, help="runs of each build kind (default: %(default)s)")
    parser.add_argument("--floor-runs", type=int, default=3, help="boots of the floor guest (default: %(default)s)")
    parser.add_argument("--boot-runs", type=int, default=2, help="boots per media (default: %(default)s)")
    parser.add_argument("--boot-timeout", type=float, default=600.0, help="seconds per boot (default: %(default)s)")
    parser.add_argument("--guest-runs", type=int, default=5, help="guest starts each way (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests on an open channel (default: %(default)s)")
    parser.add_argument("--connects", type=int, default=10, help="connect + first request (default: %(default)s)")
    parser.add_argument("--fleet-sizes", default="1,8,32", help="fleet sizes N (default: %(default)s)")
    parser.add_argument("--fleet-runs", type=int, default=3, help="fleet reports per size (default: %(default)s)")
    parser.add_argument("--load-sessions", type=int, default=32, help="concurrent sessions (default: %(default)s)")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="load test length (default: %(default)s)")
    args = parser.parse_args(argv)
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections to skip: {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    if args.build_dir and not args.key:
        parser.error("--build-dir needs --key, the operator private key that build authorizes")
    args.fleet_sizes = [int(size) for size in args.fleet_sizes.split(",")]
    return args


def guarded(key: str, title: str, measure: Callable[[], Section]) -> Section:
    """Run one section; a failure is reported with its error and the bench goes on with the next."""
    try:
        return measure()
    except Exception as error:  # one section failing must not lose the others: printed in full, kept in the JSON
        traceback.print_exc()
        return Section(key, title, status="failed", reason=f"{type(error).__name__}: {error}")


def skipped(key: str, title: str, reason: str) -> Section:
    return Section(key, title, status="skipped", reason=reason)


def measure_round_trips(args: argparse.Namespace, work: Path, progress: Progress, node: list[RoundTrips]) -> Section:
    section = Section("roundtrip", "5. request round-trip to the agent (agent.hello)")
    measured = [*node]
    if "roundtrip" not in args.skip:
        measured += measure_loopback(work, progress, args.requests, args.connects)
    elif not node:
        return skipped(section.key, section.title, "--skip roundtrip, and no booted node")
    for trips in measured:
        trips.add_rows(section)
    section.data["endpoints"] = [trips.to_json() for trips in measured]
    return section


def build_sections(args: argparse.Namespace, work: Path, progress: Progress) -> tuple[list[Section], Path | None, Path]:
    """Sizes and build times, and the build (and its operator key) the boots use."""
    if args.build_dir:
        builds = skipped("builds", TITLE_BUILDS, f"--build-dir {args.build_dir}: an existing build measured")
        build_dir, key = args.build_dir, args.key
    elif "builds" in args.skip:
        builds = skipped("builds", TITLE_BUILDS, "--skip builds")
        build_dir, key = None, Path()
    else:
        try:
            builds, build_dir, key = measure_builds(work, progress, args.build_runs, args.cache_dir)
        except Exception as error:  # reported in full, as guarded() does; the sections without a build go on
            traceback.print_exc()
            builds = Section("builds", TITLE_BUILDS, status="failed", reason=f"{type(error).__name__}: {error}")
            build_dir, key = None, Path()
    if "sizes" in args.skip:
        sizes = skipped("sizes", TITLE_SIZES, "--skip sizes")
    elif build_dir is None:
        sizes = skipped("sizes", TITLE_SIZES, "no build (builds skipped or failed, and no --build-dir)")
    else:
        sizes = guarded("sizes", TITLE_SIZES, lambda: measure_sizes(build_dir))
    return [sizes, builds], build_dir, key


def boot_sections(
    args: argparse.Namespace, work: Path, progress: Progress, accel: AccelChoice, build_dir: Path | None, key: Path
) -> tuple[list[Section], list[RoundTrips]]:
    reason = "--skip boot" if "boot" in args.skip else "no build (builds skipped or failed, and no --build-dir)"
    if "boot" in args.skip or build_dir is None:
        return [skipped("boot", TITLE_BOOT, reason), skipped("memory", TITLE_MEMORY, reason)], []
    try:
        boot, memory, trips = measure_boots(
            build_dir, key, accel, work, progress, args.boot_runs, args.boot_timeout, (args.requests, args.connects)
        )
    except Exception as error:  # reported in full, as guarded() does
        traceback.print_exc()
        failure = f"{type(error).__name__}: {error}"
        return [Section("boot", TITLE_BOOT, "failed", failure), Section("memory", TITLE_MEMORY, "failed", failure)], []
    return [boot, memory], [trips]


def bridged_section(work: Path, progress: Progress, runs: int, with_libvirt: bool) -> Section:
    with progress.step("build the tiny guest (Debian cloud kernel + busybox initramfs)"):
        guest = build_tiny_guest(work / "tiny-guest")
    # Readable by libvirt's QEMU, which runs as another user.
    for path in (work / "tiny-guest", guest.kernel, guest.initrd):
        path.chmod(0o755)
    return measure_bridged_start(work, progress, guest, runs, with_libvirt)


def floor_section(
    args: argparse.Namespace, work: Path, progress: Progress, accel: AccelChoice
) -> tuple[Section, Floor | None]:
    if "floor" in args.skip:
        return skipped("floor", FLOOR_TITLE, "--skip floor"), None
    try:
        return measure_floor(work, progress, accel, MEMORY_MB, CPUS, args.floor_runs)
    except Exception as error:  # reported in full, as guarded() does; the targets go without floors
        traceback.print_exc()
        return Section("floor", FLOOR_TITLE, status="failed", reason=f"{type(error).__name__}: {error}"), None


def run_sections(
    args: argparse.Namespace, work: Path, progress: Progress, accel: AccelChoice, sections: list[Section]
) -> None:
    """Appends each section as it is measured: on Ctrl-C the ones done are still reported. The
    targets (9) are read from the others, last; the floor (0) is measured first, so that both
    run under the same conditions as near in time as the builds allow."""
    floor_done, floor = floor_section(args, work, progress, accel)
    sections.append(floor_done)
    try:
        measure_the_rest(args, work, progress, accel, sections)
    finally:
        sections.append(target_rows({section.key: section for section in sections}, floor))


def measure_the_rest(
    args: argparse.Namespace, work: Path, progress: Progress, accel: AccelChoice, sections: list[Section]
) -> None:
    built, build_dir, key = build_sections(args, work, progress)
    sections += built
    booted, node_trips = boot_sections(args, work, progress, accel, build_dir, key)
    sections += booted
    title = "5. request round-trip to the agent (agent.hello)"
    sections.append(guarded("roundtrip", title, lambda: measure_round_trips(args, work, progress, node_trips)))
    if "guests" in args.skip:
        sections.append(skipped("guests", GUESTS_TITLE, "--skip guests"))
    else:
        with_libvirt = "libvirt" not in args.skip
        sections.append(
            guarded(
                "guests",
                GUESTS_TITLE,
                lambda: measure_guest_starts(work, progress, args.guest_runs, with_libvirt),
            )
        )
    if "bridged" in args.skip:
        sections.append(skipped("bridged", BRIDGED_TITLE, "--skip bridged"))
    else:
        with_libvirt = "libvirt" not in args.skip
        sections.append(
            guarded("bridged", BRIDGED_TITLE, lambda: bridged_section(work, progress, args.guest_runs, with_libvirt))
        )
    title = "7. fleet report: host.report from N nodes (sshd endpoints on loopback)"
    if "fleet" in args.skip:
        sections.append(skipped("fleet", title, "--skip fleet"))
    else:
        sections.append(
            guarded("fleet", title, lambda: measure_fleet(work, progress, args.fleet_sizes, args.fleet_runs))
        )
    if "load" in args.skip:
        sections.append(skipped("load", LOAD_TITLE, "--skip load"))
    else:
        sections.append(
            guarded("load", LOAD_TITLE, lambda: measure_load(work, progress, args.load_sessions, args.load_seconds))
        )
    if "migration" in args.skip:
        sections.append(skipped("migration", MIGRATION_TITLE, "--skip migration"))
    else:
        sections.append(guarded("migration", MIGRATION_TITLE, lambda: measure_migrations(work, progress)))


def format_table(machine: Machine, meta: dict[str, object], sections: list[Section]) -> str:
    lines = [
        f"appliance bench, {meta['date']}",
        f"machine: {machine.hostname}: {machine.cpu_model}, {machine.cores} cores, "
        f"{machine.memory_bytes / (1 << 30):.1f} GiB, {machine.os}, kernel {machine.kernel}",
        f"QEMU: {machine.qemu_version}; accelerator: {machine.accel} ({machine.accel_reason})",
        f"load average (1, 5, 15 min): {meta['load_start']} at start, {meta['load_end']} at end",
        f"runs: {meta['runs']}",
    ]
    if meta["interrupted"]:
        lines.append("INTERRUPTED: the sections after the last one shown were not measured")
    rows = [row for section in sections for row in section.rows]
    width = max((len(row.figure) for row in rows), default=20)
    value_width = max((len(row.value) for row in rows), default=10)
    for section in sections:
        lines.append("")
        lines.append(section.title)
        if section.status != "measured":
            lines.append(f"  ({section.status}: {section.reason})")
        elif section.reason:
            lines.append(f"  (note: {section.reason})")
        for row in section.rows:
            lines.append(f"  {row.figure:<{width}}  {row.value:<{value_width}}  {row.note}".rstrip())
    return "\n".join(lines)


def default_json_path(date: str) -> Path:
    return BENCH_DIR / "results" / f"bench-{date}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(sys.stdout, interactive=sys.stdout.isatty())
    started = datetime.now(UTC)
    date = started.strftime("%Y%m%dT%H%M%SZ")
    load_start = load_average()
    with progress.step("describe this machine (probe the accelerator)"):
        machine, accel = describe_machine()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="appliance-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # libvirt's QEMU (another user) reads the tiny guest from here
    progress.note(f"scratch space: {work}")
    sections: list[Section] = []
    interrupted = False
    try:
        run_sections(args, work, progress, accel, sections)
    except KeyboardInterrupt:
        interrupted = True
        progress.note("interrupted: reporting the sections measured so far")
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    meta: dict[str, object] = {
        "date": started.isoformat(timespec="seconds"),
        "load_start": load_start,
        "load_end": load_average(),
        "runs": f"builds {args.build_runs} each, boots {args.boot_runs} per media, guest starts {args.guest_runs} "
        f"each way, {args.requests} requests on a channel, {args.connects} connects, fleet {args.fleet_runs} per N",
        "skipped": sorted(args.skip),
        "interrupted": interrupted,
    }
    table = format_table(machine, meta, sections)
    print()
    print(table)
    path = args.json or default_json_path(date)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine.to_json(), **meta, "sections": {s.key: s.to_json() for s in sections}}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nJSON: {path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
