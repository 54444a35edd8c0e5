"""Root slots on a disk file: an upgrade written into the slot not running, refusals, resuming, and the
boot-time judge of its trial (blessed, failed health, kernel panic, hang, power cuts), and rollback by hand."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from helpers.appliance_disk import (
    LifecycleNode,
    StandIn,
    grubenv,
    make_disk,
    slot_file,
    stand_in_build,
)

from appliance.agent import slots, trial
from appliance.agent.disklayout import BOOT_CFG_FILE, BUILD_INFO_FILE, GRUBENV_TRIAL, DiskLayout
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.grubenv import GrubEnv
from appliance.agent.health import CheckResult
from appliance.agent.lifecycle_config import load_lifecycle_config

OLD = "appliance-20260101T000000Z-aaaa0000"
NEW = "appliance-20260102T000000Z-bbbb1111"


class Disk:
    """A node's disk file with build OLD in slot A, the node running it, and build NEW at hand."""

    def __init__(self, root: Path) -> None:
        self.old = stand_in_build(root / "old", OLD)
        self.new = stand_in_build(root / "new", NEW, sizes=(300_000, 600_000, 1_800_000))
        self.path = root / "disk.raw"
        self.layout: DiskLayout = make_disk(self.path, self.old)
        self.node = LifecycleNode(root / "node", self.path, "a", OLD)
        self.node.write()

    def host(self) -> slots.SlotHost:
        return slots.open_host(load_lifecycle_config(self.node.config_file))

    def env(self) -> dict[str, str]:
        return grubenv(self.path, self.layout)

    def set_env(self, **values: str) -> None:
        esp = self.layout.partition("esp")
        GrubEnv(self.path, esp.start).update(**values)

    def upgrade(self, build: StandIn | None = None) -> dict[str, object]:
        build = build or self.new
        host = self.host()
        prepared = slots.prepare(host, build.describe())
        for name in prepared["send"]:  # type: ignore[union-attr]
            data = build.files[name].read_bytes()
            entry = build.describe()["files"][name]
            slots.stage(host, name, len(data), entry["sha256"], io.BytesIO(data))
        return slots.commit(host)

    def grub_takes_the_trial(self) -> None:
        """What the disk's GRUB menu does at the next boot: clear the trial, note it as taken."""
        trial_slot = self.env()[GRUBENV_TRIAL]
        self.set_env(appliance_trial="", appliance_taken=trial_slot)

    def boot(self, slot: str, build_id: str) -> None:
        self.node = self.node.booted_into(slot, build_id)

    def report(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.node.status_file.read_text())
        return data


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    return Disk(tmp_path)


def healthy() -> list[CheckResult]:
    return [CheckResult("agent", True)]


def unhealthy() -> list[CheckResult]:
    return [CheckResult("agent", True), CheckResult("check `false`", False, "exit 1")]


def judge(disk: Disk, checks=healthy) -> tuple[str, list[str], list[bool]]:  # type: ignore[no-untyped-def]
    said: list[str] = []
    rebooted: list[bool] = []
    config = load_lifecycle_config(disk.node.config_file)
    outcome = trial.boot_check(config, said.append, lambda: rebooted.append(True), checks)
    return outcome, said, rebooted


def test_an_upgrade_writes_the_slot_not_running_and_arms_one_trial(disk: Disk) -> None:
    before = slot_file(disk.path, disk.layout, "appliance-a", "filesystem.squashfs")
    done = disk.upgrade()
    assert done["slot"] == "b" and done["armed"] is True
    for name, path in disk.new.files.items():
        assert slot_file(disk.path, disk.layout, "appliance-b", name) == path.read_bytes()
    cfg = slot_file(disk.path, disk.layout, "appliance-b", BOOT_CFG_FILE).decode()
    assert f'set appliance_build="{NEW}"' in cfg and 'set appliance_cmdline="boot=live ' in cfg
    info = json.loads(slot_file(disk.path, disk.layout, "appliance-b", BUILD_INFO_FILE))
    assert info["build_id"] == NEW and info["files"] == disk.new.describe()["files"]
    # The running slot is untouched and stays the default; the trial is armed, once.
    assert slot_file(disk.path, disk.layout, "appliance-a", "filesystem.squashfs") == before
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": "b", "appliance_taken": ""}
    report = disk.report()
    assert report["slots"] == {
        "a": {"state": "good", "build_id": OLD, "name": "appliance", "since": report["slots"]["a"]["since"]},  # type: ignore[index]
        "b": {"state": "written", "build_id": NEW, "name": "appliance", "since": report["slots"]["b"]["since"]},  # type: ignore[index]
    }
    assert report["last_upgrade"]["result"] == "armed" and report["last_upgrade"]["from_build_id"] == OLD  # type: ignore[index]
    # Nothing staged is left on the data partition.
    assert not (disk.node.data_dir / "lifecycle" / "staging").exists()


@pytest.mark.parametrize(
    ("change", "code", "said"),
    [
        ({"name": "other"}, ErrorCode.BUILD_REFUSED, "spec 'other'"),
        ({"arch": "arm64"}, ErrorCode.BUILD_REFUSED, "for arm64"),
        ({"kernel_cmdline": 'quiet init="/x y"'}, ErrorCode.INVALID_PARAMS, "command line"),
        ({"build_id": "../x"}, ErrorCode.INVALID_PARAMS, "build id"),
    ],
)
def test_a_build_the_node_cannot_take_is_refused_before_anything_is_written(
    disk: Disk, change: dict[str, str], code: ErrorCode, said: str
) -> None:
    described = {**disk.new.describe(), **change}
    with pytest.raises(AgentError) as refused:
        slots.prepare(disk.host(), described)
    assert refused.value.code == code and said in refused.value.message
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": ""}
    assert not (disk.node.data_dir / "lifecycle" / "record.json").exists()


def test_a_build_larger_than_the_slot_is_refused_naming_the_sizes(disk: Disk, tmp_path: Path) -> None:
    huge = stand_in_build(tmp_path / "huge", NEW, sizes=(300_000, 600_000, 9_000_000))
    with pytest.raises(AgentError) as refused:
        slots.prepare(disk.host(), huge.describe())
    assert refused.value.code == ErrorCode.SLOT_TOO_SMALL and "nothing was written" in refused.value.message
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": ""}


def test_the_running_build_is_a_noop_and_so_is_an_armed_one(disk: Disk) -> None:
    assert slots.prepare(disk.host(), disk.old.describe())["noop"] is True
    disk.upgrade()
    again = slots.prepare(disk.host(), disk.new.describe())
    assert again["noop"] is True and again["armed"] is True and "reboot" in again["reason"]
    assert disk.env()["appliance_trial"] == "b"


def test_a_cut_upgrade_leaves_the_slot_unusable_and_a_second_run_sends_only_the_rest(disk: Disk) -> None:
    host = disk.host()
    prepared = slots.prepare(host, disk.new.describe())
    assert prepared["send"] == ["vmlinuz", "initrd.img", "filesystem.squashfs"]
    kernel = disk.new.files["vmlinuz"].read_bytes()
    slots.stage(host, "vmlinuz", len(kernel), disk.new.describe()["files"]["vmlinuz"]["sha256"], io.BytesIO(kernel))
    squashfs = disk.new.files["filesystem.squashfs"].read_bytes()
    sha = disk.new.describe()["files"]["filesystem.squashfs"]["sha256"]
    with pytest.raises(AgentError) as cut:
        slots.stage(host, "filesystem.squashfs", len(squashfs), sha, io.BytesIO(squashfs[:1000]))
    assert cut.value.code == ErrorCode.UPLOAD_INCOMPLETE
    # The connection is gone: slot b is marked being written, never armed; slot a stays the default.
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": ""}
    assert disk.report()["slots"]["b"]["state"] == "writing"  # type: ignore[index]
    with pytest.raises(AgentError, match="not received yet"):
        slots.commit(host)
    again = slots.prepare(disk.host(), disk.new.describe())
    assert again["send"] == ["initrd.img", "filesystem.squashfs"] and again["staged"] == ["vmlinuz"]
    assert disk.upgrade()["armed"] is True


def test_a_file_whose_sha256_is_not_the_manifests_is_refused_and_not_kept(disk: Disk) -> None:
    host = disk.host()
    slots.prepare(host, disk.new.describe())
    data = disk.new.files["vmlinuz"].read_bytes()
    sha = disk.new.describe()["files"]["vmlinuz"]["sha256"]
    with pytest.raises(AgentError) as refused:
        slots.stage(host, "vmlinuz", len(data), sha, io.BytesIO(b"X" + data[1:]))
    assert refused.value.code == ErrorCode.CHECKSUM_MISMATCH
    assert slots.prepare(disk.host(), disk.new.describe())["send"][0] == "vmlinuz"
    with pytest.raises(AgentError, match="not a file of the build"):
        slots.stage(host, "vmlinuz", len(data) + 1, sha, io.BytesIO(data))


def test_no_upgrade_without_the_data_partition(disk: Disk) -> None:
    disk.node.storage_marker.write_text("ram\n")
    with pytest.raises(AgentError) as refused:
        slots.prepare(disk.host(), disk.new.describe())
    assert refused.value.code == ErrorCode.UPGRADE_CONFLICT and "not mounted" in refused.value.message


def test_a_node_booted_from_the_iso_has_no_slots(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("boot=live toram=filesystem.squashfs quiet\n")
    from appliance.agent.bootdisk import find_boot_disk

    assert find_boot_disk(cmdline=cmdline) is None


def test_a_healthy_trial_is_blessed(disk: Disk) -> None:
    disk.upgrade()
    disk.grub_takes_the_trial()
    disk.boot("b", NEW)
    outcome, _, rebooted = judge(disk, healthy)
    assert outcome == "blessed" and not rebooted
    assert disk.env() == {"appliance_slot": "b", "appliance_trial": "", "appliance_taken": ""}
    last = disk.report()["last_upgrade"]
    assert last["result"] == "blessed" and last["build_id"] == NEW and last["from_build_id"] == OLD  # type: ignore[index]
    assert {"write", "boot", "health", "bless"} <= set(last["seconds"])  # type: ignore[index]
    assert disk.report()["slots"]["b"]["state"] == "good"  # type: ignore[index]
    # The next boot is plain; then rolling back by hand makes slot a the default again.
    disk.boot("b", NEW)
    assert judge(disk)[0] == "normal"
    back = slots.rollback(disk.host())
    assert back == {"default": "a", "build_id": OLD, "from_build_id": NEW}
    assert disk.env()["appliance_slot"] == "a"
    assert "by hand" in disk.report()["last_upgrade"]["reason"]  # type: ignore[index]


def test_a_trial_that_fails_its_health_check_records_why_and_reboots(disk: Disk) -> None:
    config_timeout = LifecycleNode(disk.node.root, disk.path, "a", OLD, health_timeout=1)
    config_timeout.write()
    disk.node = config_timeout
    disk.upgrade()
    disk.grub_takes_the_trial()
    disk.boot("b", NEW)
    outcome, said, rebooted = judge(disk, unhealthy)
    assert outcome == "rolled-back" and rebooted == [True]
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": "", "appliance_taken": ""}
    assert any("check `false`" in line for line in said)
    # GRUB boots slot a again: the report says rolled back, and why.
    disk.boot("a", OLD)
    assert judge(disk)[0] == "normal"
    last = disk.report()["last_upgrade"]
    assert last["result"] == "rolled_back" and "check `false`: exit 1" in last["reason"]  # type: ignore[index]
    assert disk.report()["slots"]["b"]["state"] == "failed"  # type: ignore[index]
    with pytest.raises(AgentError) as refused:
        slots.rollback(disk.host())
    assert refused.value.code == ErrorCode.NO_ROLLBACK


def test_a_trial_whose_kernel_panics_is_reported_when_grub_boots_the_default_again(disk: Disk) -> None:
    disk.upgrade()
    disk.grub_takes_the_trial()
    # panic=5: the kernel reboots, GRUB finds no trial and boots slot a.
    disk.boot("a", OLD)
    outcome, said, _ = judge(disk)
    assert outcome == "normal"
    last = disk.report()["last_upgrade"]
    assert last["result"] == "rolled_back" and "did not reach its health check" in last["reason"]  # type: ignore[index]
    assert disk.env() == {"appliance_slot": "a", "appliance_trial": "", "appliance_taken": ""}
    assert any("did not come up" in line for line in said)


def test_a_trial_that_hangs_during_its_check_is_reported_as_such(disk: Disk) -> None:
    disk.upgrade()
    disk.grub_takes_the_trial()
    host = disk.host.__func__(disk)  # type: ignore[attr-defined]
    with host.locked() as record:
        assert record.trial is not None
        record.trial.state = "checking"
        host.save(record)
    disk.boot("a", OLD)
    judge(disk)
    assert "stopped during its health check" in disk.report()["last_upgrade"]["reason"]  # type: ignore[index]


def test_a_power_cut_while_arming_leaves_a_written_slot_and_no_verdict(disk: Disk) -> None:
    disk.upgrade()
    # The record said armed; grubenv never did.
    disk.set_env(appliance_trial="")
    disk.boot("a", OLD)
    judge(disk)
    report = disk.report()
    assert report["last_upgrade"]["result"] == "written" and report["slots"]["b"]["state"] == "written"  # type: ignore[index]
    assert report["trial"] is None


def test_a_bless_cut_between_grubenv_and_the_record_is_finished_at_the_next_boot(disk: Disk) -> None:
    disk.upgrade()
    disk.grub_takes_the_trial()
    disk.set_env(appliance_slot="b")  # the bless reached grubenv, the power went before the record
    disk.boot("b", NEW)
    judge(disk)
    assert disk.report()["last_upgrade"]["result"] == "blessed"  # type: ignore[index]


def test_no_upgrade_while_a_trial_is_judged(disk: Disk) -> None:
    disk.upgrade()
    disk.grub_takes_the_trial()
    disk.boot("b", NEW)
    other = stand_in_build(disk.node.root.parent / "third", "appliance-20260103T000000Z-cccc2222")
    with pytest.raises(AgentError) as refused:
        slots.prepare(disk.host(), other.describe())
    assert refused.value.code == ErrorCode.UPGRADE_CONFLICT and "trial" in refused.value.message
    with pytest.raises(AgentError) as again:
        slots.rollback(disk.host())
    assert again.value.code == ErrorCode.UPGRADE_CONFLICT


def test_the_slot_written_is_a_file_system_e2fsck_finds_clean(disk: Disk) -> None:
    disk.upgrade()
    slot = disk.layout.partition("appliance-b")
    done = subprocess.run(["e2fsck", "-fn", f"{disk.path}?offset={slot.start}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_spec_upgrade_section_reaches_the_node_as_written(tmp_path: Path) -> None:
    from appliance.build.render import BuildIdentity, render_image_files
    from appliance.spec import parse_spec

    checks = ["ip link show br0", 'test "$(cat /sys/x)" = \\\\ok']
    spec = parse_spec(
        f"size_budget_mb = 300\n[upgrade]\nhealth_checks = {json.dumps(checks)}\nhealth_timeout = 45\n", "t"
    )
    identity = BuildIdentity("b1", "2026-01-01T00:00:00+00:00", "ab" * 32, "0.1.0")
    (rendered,) = [path for path in render_image_files(spec, identity, tmp_path) if path.name == "lifecycle.toml"]
    config = load_lifecycle_config(rendered)
    assert config.health_checks == tuple(checks) and config.health_timeout == 45 and config.size_budget_mb == 300


def test_a_file_the_running_slot_holds_already_is_taken_from_it_not_sent(disk: Disk) -> None:
    # One build to the next of a release: the same kernel.
    disk.new.files["vmlinuz"].write_bytes(disk.old.files["vmlinuz"].read_bytes())
    prepared = slots.prepare(disk.host(), disk.new.describe())
    assert prepared["send"] == ["initrd.img", "filesystem.squashfs"] and prepared["staged"] == ["vmlinuz"]
    assert disk.upgrade()["armed"] is True
    assert slot_file(disk.path, disk.layout, "appliance-b", "vmlinuz") == disk.old.files["vmlinuz"].read_bytes()
