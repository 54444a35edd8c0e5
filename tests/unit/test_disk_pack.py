"""The disk packer's pure parts: layout, partition table, boot sector and core.img patches, GRUB config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.disk_files import gpt_partitions

from appliance.build.layout import ELEMENTS_DIR
from appliance.build.pack.budget import BudgetError, check_budget
from appliance.build.pack.disk import (
    DATA_LABEL,
    DATA_TYPE,
    ESP_TYPE,
    MiB,
    esp_serial,
    grub_fs_uuid,
    grub_values,
    partition_table_script,
    patch_boot_sector,
    patch_core_blocklist,
    plan_layout,
    slot_size,
)
from appliance.build.pack.live import PackError
from appliance.build.render import BuildIdentity, render_boot_file, render_image_files
from appliance.manifest import Artifact
from appliance.run import find_tool
from appliance.spec import Spec, parse_spec

IDENTITY = BuildIdentity("demo-20260101T000000Z-abcd1234", "2026-01-01T00:00:00+00:00", "ab" * 32, "0.1.0")


def test_slots_have_room_for_a_build_at_the_size_budget() -> None:
    # 200 MB budget, 50 MB of kernel and initrd, 10% for ext4: 275 MB, rounded up to 64 MiB.
    assert slot_size(180_000_000, 200_000_000, 50_000_000) == 320 * MiB
    # A build larger than its budget still fits its own slot (the budget check fails it later).
    assert slot_size(900_000_000, 200_000_000, 50_000_000) >= 990_000_000


def test_layout_is_aligned_in_order_and_leaves_room_for_the_backup_gpt() -> None:
    layout = plan_layout(320 * MiB, IDENTITY.build_id)
    names = [partition.name for partition in layout.partitions]
    assert names == ["bios", "esp", "appliance-a", "appliance-b", "appliance-data"]
    assert [p.number for p in layout.partitions] == [1, 2, 3, 4, 5]
    assert layout.partitions[0].start == MiB
    for before, after in zip(layout.partitions, layout.partitions[1:], strict=False):
        assert after.start == before.end
    assert all(p.start % MiB == 0 and p.size % MiB == 0 for p in layout.partitions)
    assert layout.partition("appliance-a").size == layout.partition("appliance-b").size == 320 * MiB
    # The data partition comes last, so the node can grow it into the rest of its disk.
    assert layout.partitions[-1].name == DATA_LABEL and layout.partitions[-1].type_uuid == DATA_TYPE
    assert layout.size == layout.partitions[-1].end + MiB


def test_sfdisk_writes_the_planned_table_into_a_file(tmp_path: Path) -> None:
    layout = plan_layout(64 * MiB, IDENTITY.build_id)
    image = tmp_path / "disk.raw"
    with image.open("wb") as stream:
        stream.truncate(layout.size)
    script = partition_table_script(layout, "demo")
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
                   input=script.encode(), check=True)  # fmt: skip
    found = gpt_partitions(image)
    assert [(p["start"], p["size"], p["name"], p["uuid"]) for p in found] == [
        (p.start_lba, p.size_lba, p.name, p.uuid.upper()) for p in layout.partitions
    ]
    assert found[1]["type"] == ESP_TYPE and found[4]["type"] == DATA_TYPE


def protective_mbr() -> bytes:
    sector = bytearray(512)
    sector[0x1B8:0x1BC] = b"\x11\x22\x33\x44"
    sector[0x1BE:0x1CE] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    sector[0x1FE:] = b"\x55\xaa"
    return bytes(sector)


def test_boot_sector_gets_grubs_code_and_keeps_the_partition_table() -> None:
    current = bytearray(protective_mbr())
    current[0x10:0x14] = b"BPB!"  # whatever sits in the BIOS parameter block stays
    boot_img = bytes(range(256)) * 2
    sector = patch_boot_sector(bytes(current), boot_img, core_lba=2048)
    assert len(sector) == 512
    assert sector[:3] == boot_img[:3]
    assert sector[0x10:0x14] == b"BPB!"
    assert sector[0x5A:0x5C] == boot_img[0x5A:0x5C]
    assert int.from_bytes(sector[0x5C:0x64], "little") == 2048
    assert sector[0x64:0x66] == boot_img[0x64:0x66]
    assert sector[0x66:0x68] == b"\x90\x90"
    assert sector[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert sector[0x1B8:] == current[0x1B8:]


def test_boot_sector_refuses_sectors_of_the_wrong_size() -> None:
    with pytest.raises(PackError):
        patch_boot_sector(b"\0" * 511, b"\0" * 512, 2048)


def test_core_image_points_its_first_sector_at_the_rest() -> None:
    core = b"\xaa" * 512 + b"\xbb" * 1000
    patched = patch_core_blocklist(core, core_lba=2048)
    assert len(patched) == 3 * 512
    assert patched[:500] == core[:500]
    assert int.from_bytes(patched[500:508], "little") == 2049
    assert int.from_bytes(patched[508:510], "little") == 2
    assert int.from_bytes(patched[510:512], "little") == 0x820
    assert patched[512:1512] == core[512:] and patched[1512:] == b"\0" * 24


def test_esp_serial_is_stable_per_build_and_named_as_grub_names_it() -> None:
    serial = esp_serial(IDENTITY.build_id)
    assert serial == esp_serial(IDENTITY.build_id) != esp_serial("other-build")
    assert len(serial) == 8 and int(serial, 16) >= 0
    assert grub_fs_uuid("75309B89") == "7530-9B89"


def test_partition_uuids_belong_to_the_build() -> None:
    one, again, other = (plan_layout(64 * MiB, build) for build in ("b1", "b1", "b2"))
    assert [p.uuid for p in one.partitions] == [p.uuid for p in again.partitions]
    assert not {p.uuid for p in one.partitions} & {p.uuid for p in other.partitions}
    assert len({p.uuid for p in one.partitions}) == len(one.partitions)


def test_disk_grub_config_boots_the_slot_from_the_environment_block_on_its_own_disk() -> None:
    layout = plan_layout(64 * MiB, IDENTITY.build_id)
    values = grub_values(layout, "75309B89")
    cfg = render_boot_file("disk-grub.cfg", Spec(), IDENTITY, values=values)
    assert "load_env --file $prefix/grubenv appliance_slot" in cfg
    # No search by label: another disk may carry the same labels.
    assert "search" not in cfg and "by-label" not in cfg
    assert "regexp --set=1:appliance_disk '^([^,]+)' \"$root\"" in cfg
    for letter, label in (("a", "appliance-a"), ("b", "appliance-b")):
        slot = layout.partition(label)
        chosen = f'if [ "$appliance_slot" = {letter} ]; then\n'
        chosen += f'        set slot="$appliance_disk,gpt{slot.number}"\n        set slot_uuid={slot.uuid}\n'
        assert chosen in cfg
    assert "live-media=/dev/disk/by-partuuid/$slot_uuid" in cfg
    assert "boot=live" in cfg and "console=ttyS0,115200n8" in cfg
    early = render_boot_file("disk-early.cfg", Spec(), IDENTITY, values=values)
    assert "search --no-floppy --fs-uuid --set=root 7530-9B89" in early


def test_budget_counts_the_compressed_disk_and_not_the_sparse_raw() -> None:
    check_budget((Artifact("a.raw", 900_000_000, ""), Artifact("a.qcow2", 150_000_000, "")), 200)
    with pytest.raises(BudgetError, match=r"a\.qcow2"):
        check_budget((Artifact("a.raw", 900_000_000, ""), Artifact("a.qcow2", 250_000_000, "")), 200)


def test_the_node_finds_and_grows_the_data_partition_the_packer_makes(tmp_path: Path) -> None:
    element = ELEMENTS_DIR / "appliance-data"
    definition = (element / "static/usr/lib/appliance/repart.d/50-data.conf").read_text()
    assert f"Type={DATA_TYPE.lower()}" in definition
    assert f"Label={DATA_LABEL}" in definition and "\nSizeMaxBytes=" not in definition
    spec = parse_spec('[ssh]\nuser = "ops"', "t")
    written = render_image_files(spec, IDENTITY, tmp_path)
    (env_file,) = [path for path in written if path.name == "storage.env"]
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))
    assert env == {
        "APPLIANCE_DATA_LABEL": DATA_LABEL,
        # blkid names GPT types in lower case.
        "APPLIANCE_DATA_TYPE": DATA_TYPE.lower(),
        "APPLIANCE_STATE_DIR": "/var/lib/appliance",
        "APPLIANCE_STATE_USER": "ops",
        "APPLIANCE_CLAIM_BLANK_DISK": "no",
    }


def test_the_spec_lets_the_node_claim_a_blank_disk(tmp_path: Path) -> None:
    spec = parse_spec("[storage]\nclaim_blank_disk = true", "t")
    written = render_image_files(spec, IDENTITY, tmp_path)
    (env_file,) = [path for path in written if path.name == "storage.env"]
    assert "\nAPPLIANCE_CLAIM_BLANK_DISK=yes\n" in env_file.read_text()


def test_tools_in_sbin_are_found_outside_roots_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_tool("sfdisk") in ("/usr/sbin/sfdisk", "/sbin/sfdisk")
    assert find_tool("no-such-tool-here") is None
