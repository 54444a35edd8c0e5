"""ansible-core as an operator runs it: the collection built and installed with ansible-galaxy, playbook runs
read by their recap."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.build.layout import REPOSITORY

COLLECTION = REPOSITORY / "ansible" / "ansible_collections" / "appliance" / "hypervisor"
BIN = Path(sys.executable).parent
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)\s+"
    r"failed=(?P<failed>\d+)\s+skipped=\d+\s+rescued=\d+\s+ignored=(?P<ignored>\d+)",
    re.MULTILINE,
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def recap(self) -> dict[str, dict[str, int]]:
        found = {match["host"]: {key: int(value) for key, value in match.groupdict().items() if key != "host"}
                 for match in RECAP.finditer(self.stdout)}  # fmt: skip
        assert found, self.stdout + self.stderr
        return found

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"


def install_collection(directory: Path, env: dict[str, str]) -> Path:
    """The collection built and installed as an operator would; the collections path it is in."""
    galaxy = str(BIN / "ansible-galaxy")
    build = subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path", str(directory)],
                           env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (tarball,) = directory.glob("appliance-hypervisor-*.tar.gz")
    collections = directory / "collections"
    install = subprocess.run([galaxy, "collection", "install", str(tarball), "-p", str(collections)],
                             env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return collections
