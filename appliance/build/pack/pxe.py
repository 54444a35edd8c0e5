"""The PXE set: NAME.ipxe next to the kernel, initrd and squashfs of the live set.

iPXE fetches the kernel and initrd over HTTP (or TFTP) from ${base-url};
live-boot then downloads the squashfs into RAM from the same place (fetch=),
so the server needs nothing but static files. DHCP and TFTP stay with the
operator's own infrastructure: they only have to chain this script.
"""

from __future__ import annotations

from pathlib import Path

from appliance.build.pack.live import LiveSet
from appliance.build.render import BuildIdentity, kernel_cmdline, render_boot_file
from appliance.spec import Spec

# Expanded by iPXE when it runs the script, not by us.
BASE_URL = "${base-url}"


def make_ipxe(live: LiveSet, spec: Spec, identity: BuildIdentity, out_dir: Path) -> Path:
    path = out_dir / f"{spec.name}.ipxe"
    values = {
        "kernel": live.kernel.name,
        "initrd": live.initrd.name,
        "squashfs": live.squashfs.name,
        "cmdline": kernel_cmdline(spec, fetch_url=f"{BASE_URL}{live.squashfs.name}"),
    }
    path.write_text(render_boot_file("pxe.ipxe", spec, identity, values=values))
    path.chmod(0o644)
    return path


def chain_script(base_url: str, name: str) -> str:
    """What a TFTP server (or an iPXE prompt) hands out to boot the set served at base_url."""
    return f"#!ipxe\nset base-url {base_url}\nchain ${{base-url}}{name}.ipxe\n"
