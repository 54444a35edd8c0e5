"""What the boot files say for the node's life: the disk's trial logic, the ISO's unattended install entry,
a slot's boot.cfg, and fleet upgrades in waves."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.agent.disklayout import LayoutError, MiB, boot_cfg, fits_slot, layout_for_disk, plan_layout
from appliance.build.pack.disk import grub_values
from appliance.build.render import BuildIdentity, kernel_cmdline, render_boot_file
from appliance.nodes import upgrade
from appliance.nodes.client import NodeAddress
from appliance.nodes.inventory import HostEntry
from appliance.spec import Spec

IDENTITY = BuildIdentity("demo-20260101T000000Z-abcd1234", "2026-01-01T00:00:00+00:00", "ab" * 32, "0.1.0")


def test_the_disk_menu_takes_a_trial_once_and_boots_with_panic_reboot() -> None:
    values = grub_values(plan_layout(64 * MiB, IDENTITY.build_id), "75309B89")
    cfg = render_boot_file("disk-grub.cfg", Spec(), IDENTITY, values=values)
    taken = cfg.index('set appliance_taken="$appliance_next"')
    saved = cfg.index("if save_env --file $prefix/grubenv appliance_trial appliance_taken; then")
    switched = cfg.index('set appliance_slot="$appliance_next"')
    assert cfg.index("set appliance_trial=\n") < taken < saved < switched
    assert "source ($slot)/live/boot.cfg" in cfg
    linux = next(line for line in cfg.splitlines() if line.strip().startswith("linux "))
    assert "$appliance_cmdline panic=5 appliance.slot=$appliance_slot live-media=" in linux
    # Without a boot.cfg in the slot, the command line of the build that made the disk.
    assert f'set appliance_cmdline="{kernel_cmdline(Spec())}"' in cfg


def test_the_iso_offers_an_unattended_install_to_the_first_blank_disk() -> None:
    cfg = render_boot_file("grub.cfg", Spec(), IDENTITY)
    entries = [line for line in cfg.splitlines() if line.startswith("menuentry")]
    assert len(entries) == 2 and "install to the first blank disk" in entries[1]
    assert f"linux /live/vmlinuz {kernel_cmdline(Spec())} appliance.install=first-blank-disk" in cfg
    # The live entry stays the default.
    assert "set default=0" in cfg


def test_a_slot_boot_cfg_takes_plain_kernel_arguments_only() -> None:
    assert boot_cfg("boot=live quiet", "b-1") == (
        "# Build b-1: read by the disk's GRUB menu (grub/grub.cfg on the ESP) from this root slot.\n"
        'set appliance_cmdline="boot=live quiet"\nset appliance_build="b-1"\n'
    )
    for bad in ("quiet $x", 'a"b', "x;y", ""):
        with pytest.raises(LayoutError):
            boot_cfg(bad, "b-1")


def test_an_installed_disk_gives_the_data_partition_the_rest_and_builds_fit_their_slot() -> None:
    layout = layout_for_disk(320 * MiB, IDENTITY.build_id, 4096 * MiB + 12345)
    assert layout.size <= 4096 * MiB + 12345 and layout.partitions[-1].size > 3000 * MiB
    with pytest.raises(LayoutError, match="at least"):
        layout_for_disk(320 * MiB, IDENTITY.build_id, 512 * MiB)
    assert fits_slot(290 * MiB, 320 * MiB) and not fits_slot(300 * MiB, 320 * MiB)


def entry(name: str) -> HostEntry:
    return HostEntry(name=name, address=NodeAddress(name))


def test_a_fleet_upgrades_in_waves_and_stops_at_the_first_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    upgraded: list[str] = []

    def upgrade_node(connect, address, build, options, say, sent=None):  # type: ignore[no-untyped-def]
        upgraded.append(address.host)
        if address.host == "n3":
            raise upgrade.RolledBackError("n3 rolled back to X: health")
        return upgrade.UpgradeOutcome(address.host, "b", sent_bytes=1_000_000)

    monkeypatch.setattr(upgrade, "upgrade_node", upgrade_node)
    said: list[str] = []
    outcomes = upgrade.upgrade_fleet([entry(f"n{i}") for i in range(1, 7)], lambda a: None, None,  # type: ignore[arg-type]
                                     2, upgrade.UpgradeOptions(reboot=True, wait=1), said.append)  # fmt: skip
    assert sorted(upgraded) == ["n1", "n2", "n3", "n4"]
    assert [(o.name, o.status) for o in outcomes] == [
        ("n1", "blessed"), ("n2", "blessed"), ("n3", "rolled_back"), ("n4", "blessed"), ("n5", "skipped"),
        ("n6", "skipped"),
    ]  # fmt: skip
    assert said[:2] == ["wave 1: n1, n2", "wave 2: n3, n4"]
    assert outcomes[2].code == "rolled_back"


def test_a_fleet_upgrades_one_node_at_a_time_by_default(tmp_path: Path) -> None:
    import argparse

    from appliance.cli import build_parser

    args = build_parser().parse_args(["fleet", "upgrade", "-i", str(tmp_path / "hosts"), str(tmp_path)])
    assert isinstance(args, argparse.Namespace) and args.max_parallel == 1 and args.stop_timeout == 120
