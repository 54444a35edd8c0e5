"""What of units.py runs without systemd as PID 1 (this machine); the rest is tested in the booted appliance."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.agent.model import GuestSpec, RestartPolicy
from appliance.agent.units import cgroup_limits, cpu_properties, find_user_manager, unit_name


def test_no_systemd_means_no_user_manager(tmp_path: Path) -> None:
    assert find_user_manager(systemd_dir=tmp_path / "no-systemd") is None


def test_unit_names_and_cpu_properties() -> None:
    spec = GuestSpec(name="web-1", vcpus=2, memory_mib=512, restart=RestartPolicy.ALWAYS, cpu_quota_percent=150)
    assert unit_name("web-1") == "appliance-guest-web-1.service"
    assert cpu_properties(spec) == ["CPUWeight=100", "CPUQuota=150%"]
    # A quota of 0 clears any limit set before.
    assert cpu_properties(GuestSpec(name="x", vcpus=1, memory_mib=64)) == ["CPUWeight=100", "CPUQuota="]


def test_cgroup_limits_are_read_from_the_process_cgroup() -> None:
    limits = cgroup_limits(os.getpid())
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        assert Path(limits["path"]).is_dir()
    assert cgroup_limits(2**22 + 1) == {}
