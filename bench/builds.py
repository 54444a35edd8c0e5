"""1-2. Artifact sizes from a build's manifest.json, and build times: cold, warm, rebuilds.

cold:     an empty --cache-dir, so DIB fetches and debootstraps everything again
warm:     the bench's cache (~/.cache/image-create unless --cache-dir), into a new output directory;
          the root image comes from that cache when it holds one of the same inputs (said in the row)
rebuild:  the same spec again into the warm build's directory, which already holds that build
changed:  the spec with another host name (the node's configuration, not its packages) into that directory
Each is `appliance build` as a user runs it, timed from outside.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from figures import MIB, Section, median_text, summary
from helpers.keys import make_key

from appliance.build.dib import DEFAULT_CACHE_DIR
from appliance.manifest import Manifest
from appliance.progress import Progress
from appliance.run import run
from appliance.spec import default_spec_text

VENV_BIN = Path(sys.executable).parent
TITLE_SIZES = "1. artifact sizes (manifest.json)"
TITLE_BUILDS = "2. build times (`appliance build`, default spec)"


def build_once(out_dir: Path, public_key: Path, cache_dir: Path, spec: Path | None = None) -> float:
    argv = [str(VENV_BIN / "appliance"), "build", "-o", str(out_dir), "--authorized-key", str(public_key)]
    argv += ["--cache-dir", str(cache_dir)]
    if spec is not None:
        argv.append(str(spec))
    started = time.monotonic()
    # DIB's own tools (disk-image-create, ...) live in the venv too.
    run(argv, env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    return time.monotonic() - started


def cache_is_warm(cache_dir: Path) -> bool:
    return cache_dir.is_dir() and any(cache_dir.iterdir())


def base_was_reused(build_dir: Path) -> bool:
    base = Manifest.load(build_dir).base
    return base is not None and base.reused


def measure_builds(
    work: Path, progress: Progress, runs: int, cache_dir: Path = DEFAULT_CACHE_DIR
) -> tuple[Section, Path, Path]:
    """The build section, the warm build's directory (for the boots) and its operator private key."""
    section = Section("builds", TITLE_BUILDS)
    key = make_key(work, "build-operator")
    public = key.with_suffix(".pub")
    was_warm = cache_is_warm(cache_dir)
    build_dir = work / "build"
    warm: list[float] = []
    warm_reused: list[bool] = []
    for run_number in range(runs):
        out = build_dir if run_number == 0 else work / f"build-warm-{run_number}"
        with progress.step(f"warm build {run_number + 1} of {runs} into {out}"):
            warm.append(build_once(out, public, cache_dir))
        warm_reused.append(base_was_reused(out))
        if out != build_dir:
            shutil.rmtree(out, ignore_errors=True)
    rebuild: list[float] = []
    for run_number in range(runs):
        with progress.step(f"unchanged-spec rebuild {run_number + 1} of {runs} into {build_dir}"):
            rebuild.append(build_once(build_dir, public, cache_dir))
    changed: list[float] = []
    for run_number in range(runs):
        spec = work / f"changed-{run_number}.toml"
        spec.write_text(default_spec_text().replace('hostname = "appliance"', f'hostname = "bench-{run_number}"'))
        with progress.step(f"rebuild with another host name {run_number + 1} of {runs} into {build_dir}"):
            changed.append(build_once(build_dir, public, cache_dir, spec))
    cold: list[float] = []
    for run_number in range(runs):
        cache, out = work / f"cold-cache-{run_number}", work / f"build-cold-{run_number}"
        cache.mkdir()
        try:
            with progress.step(f"cold build {run_number + 1} of {runs} (empty --cache-dir {cache})"):
                cold.append(build_once(out, public, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    warm_note = f"cache {cache_dir}" + ("" if was_warm else " was EMPTY before: the first warm build was cold")
    warm_note += "; root image " + ("from the cache (no DIB run)" if all(warm_reused) else "made by DIB")
    section.add("cold (empty cache)", median_text(cold))
    section.add("warm (cache, new output dir)", median_text(warm), warm_note)
    section.add("unchanged-spec rebuild (same output dir)", median_text(rebuild))
    section.add("rebuild after a new host name (same output dir)", median_text(changed))
    section.data = {"cold": summary(cold), "warm": summary(warm), "rebuild": summary(rebuild)}
    section.data["changed_config"] = summary(changed)
    section.data["cache_was_warm"] = was_warm
    section.data["cache_dir"] = str(cache_dir)
    section.data["warm_base_reused"] = warm_reused
    return section, build_dir, key


def measure_sizes(build_dir: Path) -> Section:
    section = Section("sizes", TITLE_SIZES)
    manifest = Manifest.load(build_dir)
    entries: list[dict[str, Any]] = [asdict(artifact) for artifact in manifest.artifacts]
    section.data = {"build_dir": str(build_dir), "build_id": manifest.build_id, "artifacts": entries}
    for entry in entries:
        size = int(entry["size_bytes"])
        note = ""
        path = build_dir / str(entry["file"])
        if path.exists() and path.stat().st_blocks * 512 < size * 0.9:
            allocated = path.stat().st_blocks * 512
            note = f"sparse: {allocated / MIB:.1f} MiB allocated"
            entry["allocated_bytes"] = allocated
        section.add(str(entry["file"]), f"{size / MIB:.1f} MiB", note)
    section.reason = f"build {manifest.build_id}, in {build_dir}"
    return section
