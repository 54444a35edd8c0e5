"""At every boot (`appliance-agent lifecycle-boot`, root): judge a trial boot, or what came of one.

A trial boot is one where GRUB took an armed slot (grubenv's appliance_taken
names the slot that runs, and it is not the default). It must pass the health
check (appliance.agent.health) within the spec's deadline: then its slot is
blessed, the default from now on; otherwise the reason is recorded and the node
reboots, and GRUB boots the default slot again.

Any other boot looks at the record for a trial that did not come back: GRUB
booted the default because the trial's kernel panicked (panic=5 reboots), the
machine hung and the watchdog reset it, or the power went. Its reason is
recorded for host.report, as is the first boot of a flashed or installed disk
(what runs in the slot it booted).

The deadline starts with this check, which waits for nothing but the ESP: a
data partition that never comes up fails the trial too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from appliance.agent.bootdisk import BootDisk, BootDiskError, find_boot_disk
from appliance.agent.disklayout import GRUBENV_SLOT, GRUBENV_TRIAL
from appliance.agent.health import CheckResult, node_checks, wait_healthy
from appliance.agent.lifecycle_config import LifecycleConfig
from appliance.agent.slots import (
    FAILED,
    GOOD,
    GRUBENV_TAKEN,
    RESULT_BLESSED,
    RESULT_ROLLED_BACK,
    WRITTEN,
    Outcome,
    Record,
    SlotHost,
    SlotInfo,
    publish_status,
    read_json,
    write_json,
)

STORAGE_WAIT = 600.0
DISK_WAIT = 30.0
UPTIME = Path("/proc/uptime")

Say = Callable[[str], None]


def uptime(path: Path = UPTIME) -> float:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_for_disk(config: LifecycleConfig, timeout: float = DISK_WAIT) -> BootDisk | None:
    """The boot disk, given udev a little time to make its partitions' devices."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return find_boot_disk(config.boot_disk, config.booted_slot)
        except BootDiskError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)


def wait_for_storage(deadline: float, marker: Path) -> str:
    """What appliance-storage decided ("persistent", "ram"), or "" if it had not by the deadline."""
    while True:
        try:
            decided = marker.read_text().strip()
        except OSError:
            decided = ""
        if decided or time.monotonic() >= deadline:
            return decided
        time.sleep(1)


def live_status(config: LifecycleConfig, reason: str) -> None:
    with suppress(OSError):
        write_json(config.status_file, {"installed": False, "reason": reason})


def assess(host: SlotHost, record: Record, env: dict[str, str], say: Say) -> bool:
    """Update the record for this boot; True when this boot is a trial to be judged now."""
    booted = host.disk.booted
    default = host.default_slot(env)
    taken = env.get(GRUBENV_TAKEN, "")
    armed = env.get(GRUBENV_TRIAL, "")
    trial = record.trial
    if trial is None:
        if taken:
            host.write_env(**{GRUBENV_TAKEN: ""})
        return False
    if trial.slot == booted:
        if booted == default:
            # The bless reached grubenv but not the record (the power went in between): finish it.
            finish(host, record, RESULT_BLESSED, "", {})
            return False
        if taken == booted:
            trial.state, trial.checking_at = "checking", time.time()
            host.save(record)
            return True
        say(f"slot {booted} was booted by hand (slot {default} is the default): it is not judged")
        return False
    if armed == trial.slot and not taken:
        say(f"a trial of slot {trial.slot} is armed for the next boot")
        return False
    if not armed and not taken and trial.state == "armed":
        # The node went down after the record said armed and before grubenv did.
        record.trial = None
        record.slots[trial.slot].state = WRITTEN
        if record.last:
            record.last.result = WRITTEN
            record.last.reason = "the node went down while the trial was being armed; run the upgrade again"
        host.save(record)
        return False
    build = trial.build_id
    if trial.state == "checking":
        reason = f"the trial boot of {build} stopped during its health check (a hang, a reset or a power cut)"
    else:
        reason = (
            f"the trial boot of {build} did not reach its health check (a kernel panic, a hang "
            "or a power cut before user space)"
        )
    say(f"slot {trial.slot} did not come up: {reason}; back on slot {booted}")
    record.slots[trial.slot].state = FAILED
    finish(host, record, RESULT_ROLLED_BACK, f"{reason}; GRUB booted slot {booted} again", {})
    return False


def finish(host: SlotHost, record: Record, result: str, reason: str, seconds: dict[str, float]) -> None:
    """Record the trial's outcome, then forget GRUB's note of having taken it."""
    trial = record.trial
    assert trial is not None
    last = record.last or Outcome(trial.build_id, trial.slot, "", result)
    record.last = Outcome(
        build_id=trial.build_id,
        slot=trial.slot,
        from_build_id=last.from_build_id,
        result=result,
        reason=reason,
        time=time.time(),
        seconds={**last.seconds, **seconds},
    )
    if result == RESULT_BLESSED:
        record.slots[trial.slot] = SlotInfo(GOOD, trial.build_id, record.slots[trial.slot].name, time.time())
    record.trial = None
    host.save(record)
    host.write_env(**{GRUBENV_TAKEN: ""})


def boot_check(
    config: LifecycleConfig,
    say: Say,
    reboot: Callable[[], None],
    checks: Callable[[], list[CheckResult]] | None = None,
) -> str:
    """What this boot is: "live", "no-data", "normal", "blessed" or "rolled-back" (and then it reboots).
    CHECKS is one round of the health check (the node's own, appliance.agent.health, unless given)."""
    started = time.monotonic()
    try:
        disk = wait_for_disk(config)
    except BootDiskError as error:
        say(f"cannot read the boot disk's slots: {error}")
        live_status(config, str(error))
        return "live"
    if disk is None:
        live_status(config, "booted from the ISO or the network: no root slots (install it on a disk first)")
        return "live"
    running = read_json(config.build_info)
    host = SlotHost(config, disk, running if isinstance(running, dict) else {})
    env = host.read_env()
    on_trial = env.get(GRUBENV_TAKEN) == disk.booted and disk.booted != host.default_slot(env)
    deadline = started + (config.health_timeout if on_trial else STORAGE_WAIT)
    if on_trial:
        say(f"trial boot of slot {disk.booted}: healthy within {config.health_timeout}s, or back to the default slot")
    if wait_for_storage(deadline, config.storage_marker) != "persistent":
        if on_trial:
            # No record can be written; GRUB's note stays, so the next boot reports the trial as failed.
            say("the data partition did not come up: the trial fails; rebooting to the default slot")
            reboot()
            return "rolled-back"
        say("no data partition: the slots' record cannot be kept")
        return "no-data"
    with host.locked() as record:
        judged = assess(host, record, env, say)
        publish_status(host, record)
    if not judged:
        return "normal"
    boot_seconds = uptime()
    checks = checks or node_checks(config.agent_user, config.health_checks)
    verdict = wait_healthy(checks, max(0.0, deadline - time.monotonic()), say)
    seconds = {"boot": round(boot_seconds, 1), "health": round(verdict.seconds, 1)}
    with host.locked() as record:
        if verdict.healthy:
            blessing = time.monotonic()
            # grubenv first: it decides the next boot; the record follows (assess finishes a bless cut between).
            host.write_env(**{GRUBENV_SLOT: disk.booted})
            seconds["bless"] = round(time.monotonic() - blessing, 3)
            finish(host, record, RESULT_BLESSED, "", seconds)
            say(
                f"slot {disk.booted} ({host.running_id}) is healthy after {verdict.seconds:.0f}s: it is the default now"
            )
            return "blessed"
        reason = f"not healthy within {config.health_timeout}s: {verdict.reason}"
        record.slots[disk.booted].state = FAILED
        finish(host, record, RESULT_ROLLED_BACK, reason, seconds)
    say(f"slot {disk.booted} ({host.running_id}) {reason}; rebooting to slot {host.disk.other}")
    reboot()
    return "rolled-back"


def report(status_file: Path) -> dict[str, object] | None:
    """What lifecycle-boot and the helper last published, for host.report; None off an appliance."""
    data = read_json(status_file)
    return data if isinstance(data, dict) else None
