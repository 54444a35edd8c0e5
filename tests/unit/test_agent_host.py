from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.agent.config import ConfigError, load_config
from appliance.agent.host import (
    collect_report,
    probe_kvm,
    read_build_id,
    read_meminfo,
    read_rss,
    read_state_device,
    read_state_storage,
)

MEMINFO = "MemTotal:       16384000 kB\nMemAvailable:    8192000 kB\nHugePages_Total:       0\n"


def test_meminfo_is_read_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    fields = read_meminfo(path)
    assert fields["MemTotal"] == 16384000 * 1024
    assert fields["HugePages_Total"] == 0


def test_rss_is_read_from_proc_status_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "status"
    path.write_text("Name:\tpython3\nVmPeak:\t   30000 kB\nVmRSS:\t   12345 kB\nThreads:\t1\n")
    assert read_rss(path) == 12345 * 1024
    path.write_text("Name:\tkthreadd\n")  # kernel threads have no VmRSS line
    assert read_rss(path) == 0


def test_build_id_comes_from_build_json(tmp_path: Path) -> None:
    path = tmp_path / "build.json"
    path.write_text(json.dumps({"build_id": "demo-1"}))
    assert read_build_id(path) == "demo-1"
    assert read_build_id(tmp_path / "missing.json") == "unknown"


def test_missing_kvm_device_is_reported_not_raised(tmp_path: Path) -> None:
    state = probe_kvm(tmp_path / "kvm")
    assert not state.present and not state.usable


def test_report_describes_this_host(tmp_path: Path) -> None:
    report = collect_report(tmp_path / "build.json")
    assert report.cpus >= 1
    assert 0 < report.memory_available_bytes <= report.memory_total_bytes
    assert report.uptime_seconds > 0
    # The agent's own resident memory: a Python process takes some MiB, far less than the host has.
    assert 1 << 20 < report.agent_rss_bytes < report.memory_total_bytes


def test_config_defaults_and_file(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml").state_dir == Path("/var/lib/appliance")
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nstate_dir = "/srv/state"\nready_marker = "UP"\n')
    config = load_config(path)
    assert config.state_dir == Path("/srv/state") and config.ready_marker == "UP"
    assert config.accel == "auto"
    path.write_text('[agent]\naccel = "kvm:tcg"\n')
    with pytest.raises(ConfigError, match="allowed: auto, kvm, tcg"):
        load_config(path)


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.agent", *args], capture_output=True, text=True, check=False)


def test_agent_report_command_prints_json(tmp_path: Path) -> None:
    build = tmp_path / "build.json"
    build.write_text(json.dumps({"build_id": "demo-2"}))
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nbuild_info = "{build}"\n')
    result = run_agent("--config", str(config), "report")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["build_id"] == "demo-2"
    assert {
        "hostname",
        "kernel",
        "cpus",
        "memory_total_bytes",
        "memory_available_bytes",
        "kvm",
        "uptime_seconds",
        "agent_rss_bytes",
    } <= set(report)


def test_agent_ready_writes_one_marker_line(tmp_path: Path) -> None:
    console = tmp_path / "console"
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nready_marker = "NODE-UP"\n')
    state = tmp_path / "state"
    result = run_agent("--config", str(config), "--state-dir", str(state), "ready", "--console", str(console))
    assert result.returncode == 0, result.stderr
    lines = console.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("NODE-UP host=")
    # The accelerator named is the probe's answer, kept for the agents that follow.
    probed = json.loads((state / "accel-probe.json").read_text())
    assert lines[0].endswith(f" accel={probed['accel']}")


def test_broken_config_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent\n")
    result = run_agent("--config", str(config), "report")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_state_storage_is_read_from_the_boot_marker(tmp_path: Path) -> None:
    marker = tmp_path / "storage"
    assert read_state_storage(marker) == "unknown"
    marker.write_text("ram\n")
    assert read_state_storage(marker) == "ram"
    device = tmp_path / "storage-device"
    assert read_state_device(device) == ""
    device.write_text("/dev/vda5\n")
    assert read_state_device(device) == "/dev/vda5"
