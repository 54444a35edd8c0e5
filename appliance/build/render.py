"""Spec -> files, through the jinja2 templates in templates/.

Pure: reads templates and writes only below the directory it is given, so it
is testable without a build. templates/image/ELEMENT/PATH.j2 becomes
ELEMENT/static/PATH in the elements directory handed to DIB; templates/boot/
holds the boot loader files the packer needs. (The disk's partition table is
data, written by appliance.agent.disklayout, which the node uses too.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from appliance.build.layout import TEMPLATES_DIR
from appliance.spec import BREAK_GLASS_USER, Spec

READY_MARKER = "APPLIANCE-READY"


@dataclass(frozen=True)
class BuildIdentity:
    """What makes one build of a spec distinct: written to /etc/appliance/build.json."""

    build_id: str
    created: str
    spec_sha256: str
    tool_version: str


def _environment(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def kernel_cmdline(spec: Spec, templates_dir: Path = TEMPLATES_DIR, fetch_url: str = "") -> str:
    """The kernel command line; with fetch_url, live-boot downloads the root from there (PXE)."""
    text = _environment(templates_dir).get_template("boot/cmdline.j2").render(spec=spec, fetch_url=fetch_url)
    return " ".join(text.split())


def build_info(spec: Spec, identity: BuildIdentity, templates_dir: Path = TEMPLATES_DIR) -> dict[str, object]:
    """The contents of /etc/appliance/build.json."""
    return {
        **asdict(identity),
        "name": spec.name,
        "release": spec.release,
        "hostname": spec.hostname,
        "kernel_cmdline": kernel_cmdline(spec, templates_dir),
        "ready_marker": READY_MARKER,
    }


def render_image_files(
    spec: Spec, identity: BuildIdentity, elements_dir: Path, templates_dir: Path = TEMPLATES_DIR
) -> list[Path]:
    """Render templates/image/ into each element's static/ tree; returns the files written."""
    environment = _environment(templates_dir)
    context = {
        "spec": spec,
        "build": build_info(spec, identity, templates_dir),
        "ready_marker": READY_MARKER,
        "break_glass_user": BREAK_GLASS_USER,
    }
    written = []
    image_root = templates_dir / "image"
    for template_path in sorted(image_root.rglob("*.j2")):
        relative = template_path.relative_to(image_root)
        element, inside = relative.parts[0], Path(*relative.parts[1:])
        target = elements_dir / element / "static" / inside.with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(environment.get_template(f"image/{relative.as_posix()}").render(context))
        written.append(target)
    return written


def render_boot_file(
    name: str,
    spec: Spec,
    identity: BuildIdentity,
    templates_dir: Path = TEMPLATES_DIR,
    values: Mapping[str, object] | None = None,
) -> str:
    """Render templates/boot/NAME.j2 (grub.cfg, ...) for the packer; `values` are what the packer
    alone knows (labels, a file system's serial) on top of the spec's."""
    context = {
        "spec": spec,
        "build": build_info(spec, identity, templates_dir),
        "cmdline": kernel_cmdline(spec, templates_dir),
        "serial_unit": int(spec.console.serial_port.removeprefix("ttyS")),
        **(values or {}),
    }
    return _environment(templates_dir).get_template(f"boot/{name}.j2").render(context)
