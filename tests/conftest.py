"""Shared fixtures: keys made by ssh-keygen, and the one built image the slow tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.spec import default_spec_text


def make_key(directory: Path, name: str = "operator") -> Path:
    """A fresh ed25519 key pair made by the real ssh-keygen; returns the private key path."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


@pytest.fixture
def public_key(tmp_path: Path) -> str:
    return (make_key(tmp_path).with_suffix(".pub")).read_text().strip()


@pytest.fixture(scope="session")
def operator_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reuse = os.environ.get("APPLIANCE_TEST_KEY")
    if reuse:
        return Path(reuse)
    return make_key(tmp_path_factory.mktemp("keys"))


def claiming_spec_text() -> str:
    """The default spec, but the node may claim a blank disk (test_image_uefi.py gives it one)."""
    default = default_spec_text()
    changed = default.replace("claim_blank_disk = false", "claim_blank_disk = true")
    assert changed != default, "the default spec no longer sets claim_blank_disk"
    return changed


@pytest.fixture(scope="session")
def built_appliance(tmp_path_factory: pytest.TempPathFactory, operator_key: Path) -> Path:
    """The default appliance (claiming a blank disk), built once per session with the test operator key.

    APPLIANCE_TEST_BUILD=DIR with APPLIANCE_TEST_KEY=PRIVATE_KEY reuses an
    existing build (for working on the boot tests); CI always builds.
    """
    reuse = os.environ.get("APPLIANCE_TEST_BUILD")
    if reuse:
        return Path(reuse)
    out_dir = tmp_path_factory.mktemp("build")
    spec = tmp_path_factory.mktemp("spec") / "appliance.toml"
    spec.write_text(claiming_spec_text())
    subprocess.run(
        ["appliance", "build", str(spec), "-o", str(out_dir), "--authorized-key", f"{operator_key}.pub"],
        check=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    return out_dir
