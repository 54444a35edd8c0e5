"""`appliance build`: spec -> root image (DIB, or the cached base) + the node's configuration -> boot
artifacts + manifest.

The root image depends only on what DIB reads (appliance.build.base): with the
same package set, elements and agent it comes from the cache and DIB does not
run. The node's configuration (host name, keys, policy, network) is rendered
from templates/image/ and templates/network/ and packed in front of the initrd
(appliance.build.pack.config), so changing it costs seconds.

Everything is made in DIR/.work first; artifacts move into DIR only when the
whole build succeeded, so a failed build never destroys the previous one.
The full DIB log is kept at DIR/build.log either way.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from appliance import __version__
from appliance.agent.disklayout import BUILD_INFO_FILE, DISK_BOOT_DIR, LIVE_DIR, build_info_text
from appliance.build.base import Base, base_key, build_base, copy_files, find_base
from appliance.build.dib import ARCH, DEFAULT_CACHE_DIR, build_invocation
from appliance.build.layout import AGENT_DIR, ELEMENTS_DIR, TEMPLATES_DIR
from appliance.build.mirrors import host_mirrors
from appliance.build.pack.budget import check_budget
from appliance.build.pack.config import config_cpio, layered_initrd, rendered_config
from appliance.build.pack.disk import live_build_info, make_disk, make_disk_boot_files
from appliance.build.pack.iso import make_iso
from appliance.build.pack.live import LiveSet
from appliance.build.pack.pxe import make_ipxe
from appliance.build.render import BuildIdentity, kernel_cmdline, render_boot_file, render_image_files
from appliance.errors import ApplianceError
from appliance.manifest import Manifest, describe_artifacts, write_manifest
from appliance.progress import Progress
from appliance.run import find_tool
from appliance.spec import Output, Problem, Spec, SpecError, check_public_key

REQUIRED_TOOLS = (
    "debootstrap", "mksquashfs", "grub-mkrescue", "grub-mkimage", "grub-editenv", "xorriso", "mformat", "mcopy",
    "mkfs.vfat", "mke2fs", "sfdisk", "qemu-img", "sudo",
)  # fmt: skip


class MissingToolsError(ApplianceError):
    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(f"missing tools on this machine: {', '.join(missing)} (run `make deps`)")


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest_path: Path
    artifacts: tuple[Path, ...]
    seconds: float


def read_key_files(paths: list[Path]) -> tuple[str, ...]:
    """Public key lines from --authorized-key files, every bad line reported."""
    keys: list[str] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            problems.append(Problem(f"--authorized-key {path}", str(path), f"cannot be read: {error.strerror}"))
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            reason = check_public_key(line)
            if reason:
                problems.append(Problem(f"--authorized-key {path} line {number}", line[:60], reason))
            else:
                keys.append(line.strip())
    if problems:
        raise SpecError("--authorized-key", problems)
    return tuple(keys)


def check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if find_tool(tool) is None]
    if missing:
        raise MissingToolsError(missing)


def new_identity(spec: Spec, now: datetime) -> BuildIdentity:
    digest = spec.digest()
    return BuildIdentity(
        build_id=f"{spec.name}-{now:%Y%m%dT%H%M%SZ}-{digest[:8]}",
        created=now.isoformat(timespec="seconds"),
        spec_sha256=digest,
        tool_version=__version__,
    )


def build(
    spec: Spec,
    out_dir: Path,
    progress: Progress,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    fresh_base: bool = False,
) -> BuildResult:
    check_tools()
    started = time.monotonic()
    identity = new_identity(spec, datetime.now(UTC))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    shutil.rmtree(work, ignore_errors=True)
    staged = work / "out"
    staged.mkdir(parents=True)
    progress.note(f"build {identity.build_id} into {out_dir}")

    base = root_image(spec, work, out_dir / "build.log", progress, cache_dir, fresh_base)

    with progress.step("render the node's configuration (host name, keys, policy, network)"):
        render_image_files(spec, identity, work / "rendered", TEMPLATES_DIR)
        created = int(datetime.fromisoformat(identity.created).timestamp())
        config = config_cpio(rendered_config(work / "rendered"), mtime=created)

    with progress.step("pack boot artifacts"):
        live = LiveSet(
            squashfs=staged / f"{spec.name}.squashfs",
            kernel=staged / f"{spec.name}.vmlinuz",
            initrd=staged / f"{spec.name}.initrd",
        )
        copy_files(((base.squashfs, live.squashfs), (base.kernel, live.kernel)))
        layered_initrd(config, base.initrd, live.initrd)
        made = [live.kernel, live.initrd, live.squashfs]
        if {Output.ISO, Output.DISK} & set(spec.outputs):
            # The disk image boots with these, and the ISO carries them for `node install`.
            boot_files = make_disk_boot_files(spec, identity, work / "disk-boot")
        # The ISO and the disk image are made side by side: each is mostly one tool's I/O.
        with ThreadPoolExecutor(max_workers=2) as pool:
            iso = disk = None
            if Output.ISO in spec.outputs:
                info = work / BUILD_INFO_FILE
                info.write_text(build_info_text(live_build_info(live, spec, identity, ARCH)))
                extra = {f"{LIVE_DIR}/{BUILD_INFO_FILE}": info}
                extra |= {f"{DISK_BOOT_DIR}/{name}": path for name, path in boot_files.by_name().items()}
                grub_cfg = render_boot_file("grub.cfg", spec, identity)
                iso = pool.submit(make_iso, live, grub_cfg, staged / f"{spec.name}.iso", spec.name, extra)
            if Output.DISK in spec.outputs:
                disk = pool.submit(make_disk, live, spec, identity, staged, boot_files, ARCH)
            if Output.PXE in spec.outputs:
                made.append(make_ipxe(live, spec, identity, staged))
            if iso is not None:
                made.append(iso.result())
            if disk is not None:
                images = disk.result()
                made += [images.raw, images.qcow2]
        artifacts = describe_artifacts(made)
        check_budget(artifacts, spec.size_budget_mb)

    seconds = time.monotonic() - started
    manifest = Manifest(
        name=spec.name,
        build_id=identity.build_id,
        created=identity.created,
        spec_sha256=identity.spec_sha256,
        tool_version=__version__,
        dib_version=metadata.version("diskimage-builder"),
        release=spec.release,
        ssh_user=spec.ssh.user,
        kernel_cmdline=kernel_cmdline(spec),
        build_seconds=round(seconds, 1),
        artifacts=artifacts,
        packages=base.packages,
        base=base.describe(),
    )
    final = [out_dir / path.name for path in made]
    for source, target in zip(made, final, strict=True):
        source.replace(target)
    manifest_path = write_manifest(manifest, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out_dir=out_dir, manifest_path=manifest_path, artifacts=tuple(final), seconds=seconds)


def root_image(spec: Spec, work: Path, log: Path, progress: Progress, cache_dir: Path, fresh_base: bool) -> Base:
    """The base for this spec's package set: from the cache when one of the same inputs is there
    (DIB does not run at all), else made by DIB and stored there."""
    # DIB reads a copy, so that what it builds is what the key names even if the tree changes meanwhile.
    elements_dir = work / "elements"
    shutil.copytree(ELEMENTS_DIR, elements_dir, symlinks=True)
    invocation = build_invocation(
        spec,
        elements_dir=elements_dir,
        agent_dir=AGENT_DIR,
        output_prefix=work / "dib" / spec.name,
        mirrors=host_mirrors(),
        cache_dir=cache_dir,
    )
    key = base_key(invocation, elements_dir, AGENT_DIR, metadata.version("diskimage-builder"))
    found = None if fresh_base else find_base(cache_dir, key)
    if found is not None:
        log.write_text(
            f"No DIB run in this build: the root image is base {key}, made by DIB {found.built} "
            f"and kept in {found.directory.parent}. That run's log:\n\n{found.log.read_text()}"
        )
        progress.note(
            f"root image: base {key[:12]} from {found.built} (same packages, elements, agent and DIB; "
            f"--fresh-base makes it anew)"
        )
        return found
    with progress.step(f"build the {spec.release} root with diskimage-builder (log: {log})"):
        invocation.output_prefix.parent.mkdir(parents=True)
        base = build_base(
            invocation,
            key,
            cache_dir,
            log,
            lambda phase, script: progress.detail(f"{phase} {script}"),
            progress.note,
        )
    progress.note(f"root image: base {key[:12]} stored in {base.directory.parent}")
    return base
