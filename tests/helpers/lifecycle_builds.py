"""The extra builds the lifecycle tests upgrade to, each a variant of the session's test spec.

  b  another host name, state in RAM on the ISO (no blank disk claimed): the upgrade
     target, and the ISO the install and first-boot tests boot; no operator health
     check, and a longer deadline (its trial runs nested under TCG on a busy machine)
  p  a kernel that panics at boot: [kernel] cmdline with rdinit=/nonexistent (no init,
     no root; init= would not do: the initramfs falls back to /sbin/init)

The build that never gets healthy is the session's own (its spec's check fails
while a marker file is on the data partition): one build fewer. These are
built after the session's build (DIB's cache makes the root's packages a local
copy) with only the outputs their tests use.
APPLIANCE_TEST_LIFECYCLE_BUILDS=DIR reuses DIR/b and DIR/p made earlier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def variant(text: str, **changes: str) -> str:
    for default, wanted in changes.items():
        assert default in text, f"the test spec no longer says {default}"
        text = text.replace(default, wanted)
    return text


def variants(test_spec: str) -> dict[str, str]:
    no_claim = {"claim_blank_disk = true": "claim_blank_disk = false"}
    outputs = 'outputs = ["squashfs", "iso", "disk", "pxe"]'
    (check_line,) = [line for line in test_spec.splitlines() if line.startswith("health_checks = ")]
    return {
        "b": variant(test_spec, **no_claim, **{'hostname = "appliance"': 'hostname = "appliance-b"',
                                                outputs: 'outputs = ["squashfs", "iso"]',
                                                check_line: "health_checks = []",
                                                "health_timeout = 30": "health_timeout = 600"}),
        "p": variant(test_spec, **no_claim, **{outputs: 'outputs = ["squashfs"]',
                                                'cmdline = ["quiet"]': 'cmdline = ["quiet", "rdinit=/nonexistent"]'}),
    }  # fmt: skip


@dataclass(frozen=True)
class LifecycleBuilds:
    b: Path
    p: Path
    seconds: dict[str, float]


def build_variants(test_spec: str, operator_key: Path, directory: Path) -> LifecycleBuilds:
    reuse = os.environ.get("APPLIANCE_TEST_LIFECYCLE_BUILDS")
    if reuse:
        return LifecycleBuilds(Path(reuse) / "b", Path(reuse) / "p", {})
    seconds = {}
    for name, text in variants(test_spec).items():
        spec = directory / f"{name}.toml"
        spec.write_text(text)
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "appliance.cli", "build", str(spec), "-o", str(directory / name),
             "--authorized-key", f"{operator_key}.pub"],
            check=True,
        )  # fmt: skip
        seconds[name] = time.monotonic() - started
    return LifecycleBuilds(directory / "b", directory / "p", seconds)
