from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.build.render import (
    READY_MARKER,
    BuildIdentity,
    build_info,
    kernel_cmdline,
    render_boot_file,
    render_image_files,
)
from appliance.spec import Spec, parse_spec

IDENTITY = BuildIdentity(
    build_id="demo-20260101T000000Z-abcd1234",
    created="2026-01-01T00:00:00+00:00",
    spec_sha256="ab" * 32,
    tool_version="0.1.0",
)


@pytest.fixture
def spec(public_key: str) -> Spec:
    return parse_spec(
        f'name = "demo"\nhostname = "hv07"\n[kernel]\ncmdline = ["intel_iommu=on"]\n'
        f'[ssh]\nuser = "ops"\nauthorized_keys = ["{public_key}"]',
        "t",
    )


def rendered(spec: Spec, tmp_path: Path) -> dict[str, str]:
    written = render_image_files(spec, IDENTITY, tmp_path)
    return {path.relative_to(tmp_path).as_posix(): path.read_text() for path in written}


def test_image_templates_land_in_their_elements_static_tree(spec: Spec, tmp_path: Path) -> None:
    files = rendered(spec, tmp_path)
    assert files["appliance-base/static/etc/hostname"] == "hv07\n"
    assert "appliance-ssh/static/etc/ssh/sshd_config.d/50-appliance.conf" in files
    assert "appliance-network/static/etc/systemd/network/40-appliance-br0.network" in files
    assert "appliance-agent/static/etc/appliance/agent.toml" in files
    assert not any(name.endswith(".j2") for name in files)


def test_build_json_carries_the_identity_and_cmdline(spec: Spec, tmp_path: Path) -> None:
    info = json.loads(rendered(spec, tmp_path)["appliance-base/static/etc/appliance/build.json"])
    assert info["build_id"] == IDENTITY.build_id
    assert info["spec_sha256"] == IDENTITY.spec_sha256
    assert info["hostname"] == "hv07"
    assert info["ready_marker"] == READY_MARKER
    assert info["kernel_cmdline"] == kernel_cmdline(spec)
    assert info == json.loads(json.dumps(build_info(spec, IDENTITY)))


def test_operator_keys_are_restricted_and_only_for_the_agent_user(spec: Spec, tmp_path: Path, public_key: str) -> None:
    files = rendered(spec, tmp_path)
    keys = [
        line
        for line in files["appliance-ssh/static/etc/ssh/authorized_keys/agent-user"].splitlines()
        if not line.startswith("#")
    ]
    assert keys == [f'restrict,command="/usr/bin/appliance-agent serve" {public_key}']
    sshd = files["appliance-ssh/static/etc/ssh/sshd_config.d/50-appliance.conf"]
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    assert "AllowUsers ops" in sshd and "Match User ops" in sshd
    assert "AuthorizedKeysFile none" in sshd


def test_sshd_takes_a_fleets_burst_of_connections(spec: Spec, tmp_path: Path) -> None:
    sshd = rendered(spec, tmp_path)["appliance-ssh/static/etc/ssh/sshd_config.d/50-appliance.conf"]
    (setting,) = [line.split()[1] for line in sshd.splitlines() if line.startswith("MaxStartups ")]
    assert int(setting.split(":")[0]) >= 64  # drops start only past 64 unauthenticated connections


def test_agent_config_names_the_agent_user(spec: Spec, tmp_path: Path) -> None:
    import tomllib

    config = tomllib.loads(rendered(spec, tmp_path)["appliance-agent/static/etc/appliance/agent.toml"])
    assert config["agent"]["user"] == "ops"
    assert config["agent"]["ready_marker"] == READY_MARKER


def test_agent_config_lets_guests_on_br0_only_through_the_tap_helpers_socket(spec: Spec, tmp_path: Path) -> None:
    from appliance.agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text(rendered(spec, tmp_path)["appliance-agent/static/etc/appliance/agent.toml"])
    network = load_config(path).network
    assert network.allowed_bridges == ("br0",)
    assert str(network.tap_helper_socket) == "/run/appliance/tap-helper.sock"


def test_networkd_never_blocks_boot(spec: Spec, tmp_path: Path) -> None:
    units = {name: text for name, text in rendered(spec, tmp_path).items() if name.endswith(".network")}
    assert units and all("RequiredForOnline=no" in text for text in units.values())
    assert "DHCP=yes" in units["appliance-network/static/etc/systemd/network/40-appliance-br0.network"]


def test_cmdline_puts_serial_last_so_it_gets_dev_console(spec: Spec) -> None:
    assert (
        kernel_cmdline(spec)
        == "boot=live nonetworking transparent_hugepage=madvise console=tty0 console=ttyS0,115200n8 intel_iommu=on"
    )


def test_cmdline_follows_console_choice() -> None:
    serial_only = parse_spec('[console]\nvga = false\nserial_port = "ttyS1"\nbaud = 9600\n[kernel]\ncmdline = []', "t")
    assert kernel_cmdline(serial_only) == "boot=live nonetworking transparent_hugepage=madvise console=ttyS1,9600n8"
    vga_only = parse_spec("[console]\nserial = false\n[kernel]\ncmdline = []", "t")
    assert kernel_cmdline(vga_only) == "boot=live nonetworking transparent_hugepage=madvise console=tty0"


def test_grub_cfg_boots_the_live_kernel_with_the_cmdline(spec: Spec) -> None:
    grub = render_boot_file("grub.cfg", spec, IDENTITY)
    assert f"linux /live/vmlinuz {kernel_cmdline(spec)}" in grub
    assert "initrd /live/initrd.img" in grub
    assert "serial --unit=0 --speed=115200" in grub
    assert IDENTITY.build_id in grub


def test_grub_cfg_without_serial_has_no_serial_terminal() -> None:
    grub = render_boot_file("grub.cfg", parse_spec("[console]\nserial = false", "t"), IDENTITY)
    assert "serial" not in grub.replace("# GRUB", "")


def test_rendering_is_pure(spec: Spec, tmp_path: Path) -> None:
    assert rendered(spec, tmp_path / "a") == {name: text for name, text in rendered(spec, tmp_path / "b").items()}


def test_break_glass_is_off_unless_keys_are_given(spec: Spec, tmp_path: Path, public_key: str) -> None:
    sshd = rendered(spec, tmp_path / "off")["appliance-ssh/static/etc/ssh/sshd_config.d/50-appliance.conf"]
    assert "breakglass" not in sshd
    with_glass = parse_spec(f'[ssh]\nbreak_glass_keys = ["{public_key}"]', "t")
    files = rendered(with_glass, tmp_path / "on")
    sshd = files["appliance-ssh/static/etc/ssh/sshd_config.d/50-appliance.conf"]
    assert "AllowUsers appliance breakglass" in sshd and "Match User breakglass" in sshd
    assert public_key in files["appliance-ssh/static/etc/ssh/authorized_keys/break-glass"]
    assert "restrict" not in files["appliance-ssh/static/etc/ssh/authorized_keys/break-glass"]
