"""The one built appliance every system test shares, built once per session (each file here is marked slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.manifest import ArtifactKind, Manifest
from appliance.spec import default_spec_text

# An operator health check that fails while this file is on the node's data partition:
# test_lifecycle.py upgrades to this build with it there, for a trial that never gets healthy.
UNHEALTHY_MARKER = "/var/lib/appliance-data/unhealthy"
UNHEALTHY_TIMEOUT = 30


def spec_text_for_tests(operator_public_key: str) -> str:
    """The default spec, but the node may claim a blank disk (test_image_uefi.py gives it
    one), its br0 is VLAN-aware, the operator key also opens the break-glass shell
    (test_image.py uses both), and a trial boot of it must pass a check on UNHEALTHY_MARKER
    within 30 s (test_lifecycle.py)."""
    changes = {
        "claim_blank_disk = false": "claim_blank_disk = true",
        # Untagged traffic (the node's DHCP, guests without a VLAN) is as on the default;
        # test_image.py checks VLANs on top.
        'ports = ["first-wired"], vlan_aware = false': 'ports = ["first-wired"], vlan_aware = true',
        "break_glass_keys = []": f'break_glass_keys = ["{operator_public_key}"]',
        "health_checks = []": f'health_checks = ["test ! -e {UNHEALTHY_MARKER}"]',
        "health_timeout = 180": f"health_timeout = {UNHEALTHY_TIMEOUT}",
    }
    text = default_spec_text()
    for default, wanted in changes.items():
        assert default in text, f"the default spec no longer says {default}"
        text = text.replace(default, wanted)
    return text


def own_copy(build: Path, directory: Path, kinds: tuple[ArtifactKind, ...]) -> Path:
    """The build's manifest and the artifacts a boot needs, in a directory whose run/ is this test's."""
    directory.mkdir()
    manifest = Manifest.load(build)
    for kind in kinds:
        source = manifest.artifact(kind)
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(directory / source.name)],
                       check=True)  # fmt: skip
    shutil.copy(build / "manifest.json", directory / "manifest.json")
    return directory


@pytest.fixture(scope="session")
def built_appliance(tmp_path_factory: pytest.TempPathFactory, operator_key: Path) -> Path:
    """The default appliance (see spec_text_for_tests), built once per session with the test operator key.

    APPLIANCE_TEST_BUILD=DIR with APPLIANCE_TEST_KEY=PRIVATE_KEY reuses an
    existing build (for working on the boot tests); CI always builds.
    """
    reuse = os.environ.get("APPLIANCE_TEST_BUILD")
    if reuse:
        return Path(reuse)
    out_dir = tmp_path_factory.mktemp("build")
    spec = tmp_path_factory.mktemp("spec") / "appliance.toml"
    spec.write_text(spec_text_for_tests(Path(f"{operator_key}.pub").read_text().strip()))
    subprocess.run(
        ["appliance", "build", str(spec), "-o", str(out_dir), "--authorized-key", f"{operator_key}.pub"],
        check=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    return out_dir
