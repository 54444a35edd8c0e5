from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.spec import default_spec_text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False)


def test_init_writes_the_starter_spec_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "appliance.toml"
    assert main(["init", str(target)]) == 0
    assert target.read_text() == default_spec_text()
    target.write_text("# mine")
    assert main(["init", str(target)]) == 1
    assert target.read_text() == "# mine"


def test_check_accepts_the_default_and_reports_bad_specs_without_traceback(tmp_path: Path) -> None:
    assert run_cli("check").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('release = "sid"\nsize_budget_mb = -5\n')
    result = run_cli("check", str(bad))
    assert result.returncode == 2
    assert "release = 'sid'" in result.stderr and "size_budget_mb = -5" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_with_a_bad_key_file_fails_before_building(tmp_path: Path) -> None:
    keys = tmp_path / "keys.pub"
    keys.write_text("# operators\nnot-a-key\n")
    result = run_cli("build", "-o", str(tmp_path / "out"), "--authorized-key", str(keys))
    assert result.returncode == 2
    assert f"--authorized-key {keys} line 2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_boot_of_an_empty_directory_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli("boot", str(tmp_path), "--accel", "tcg")
    assert result.returncode == 1
    assert "appliance build" in result.stderr and "Traceback" not in result.stderr


def test_boot_takes_one_to_four_nics(tmp_path: Path) -> None:
    result = run_cli("boot", str(tmp_path), "--nics", "5")
    assert result.returncode == 2 and "'5': a node here has 1 to 4 NICs" in result.stderr
    # Two NICs parse; the boot then fails on the empty directory, as without them.
    result = run_cli("boot", str(tmp_path), "--accel", "tcg", "--nics", "2")
    assert result.returncode == 1 and "appliance build" in result.stderr


def test_stop_with_nothing_running_is_fine(tmp_path: Path) -> None:
    result = run_cli("stop", str(tmp_path))
    assert result.returncode == 0 and "no appliance running" in result.stdout


@pytest.mark.parametrize("verb", ["init", "check", "build", "boot", "stop", "flash"])
def test_every_verb_has_help_with_an_example(verb: str) -> None:
    result = run_cli(verb, "--help")
    assert result.returncode == 0 and "example:" in result.stdout


def test_usage_error_exits_2() -> None:
    assert run_cli("frobnicate").returncode == 2
