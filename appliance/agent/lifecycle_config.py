"""The node's lifecycle configuration: /etc/appliance/lifecycle.toml, rendered from the spec.

Read by the agent (where the root lifecycle helper listens) and by the root
side itself (the helper, the boot-time check, the installer): the spec's
[upgrade] health checks and deadline, its size budget (an install sizes its
slots by it, as the packer does), and where things are. APPLIANCE_LIFECYCLE_CONFIG
names another file (the tests', whose "disk" is a disk image file).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path("/etc/appliance/lifecycle.toml")
ENV_PATH = "APPLIANCE_LIFECYCLE_CONFIG"
DEFAULT_HEALTH_TIMEOUT = 180
MAX_HEALTH_TIMEOUT = 3600
MAX_CHECKS = 32
MAX_CHECK_LENGTH = 1000
# On the data partition: the first-boot configuration last taken, applied again when no volume is there.
FIRSTBOOT_SAVED = "firstboot"


class LifecycleConfigError(Exception):
    """The file cannot be read, or holds a value that is not allowed."""


@dataclass(frozen=True)
class LifecycleConfig:
    # [upgrade]: what a trial boot must pass, and by when (seconds from the check's start).
    health_checks: tuple[str, ...] = ()
    health_timeout: int = DEFAULT_HEALTH_TIMEOUT
    # [node]
    size_budget_mb: int = 200
    data_dir: Path = Path("/var/lib/appliance-data")
    state_dir: Path = Path("/var/lib/appliance")
    status_file: Path = Path("/run/appliance/lifecycle.json")
    # What appliance-storage decided: "persistent" when the data partition is mounted.
    storage_marker: Path = Path("/run/appliance/storage")
    firstboot_file: Path = Path("/run/appliance/firstboot.json")
    # The seed this boot took its configuration from (root only); `node install` carries it to the disk.
    firstboot_seed: Path = Path("/run/appliance/firstboot-seed")
    build_info: Path = Path("/etc/appliance/build.json")
    agent_user: str = "appliance"
    # Set only where /proc/cmdline cannot say (tests): the boot disk (a device or a disk image
    # file) and the slot booted from it.
    boot_disk: str = ""
    booted_slot: str = ""
    # [helper]
    helper_socket: Path = Path("/run/appliance/lifecycle-helper.sock")

    @property
    def firstboot_saved(self) -> Path:
        return self.data_dir / FIRSTBOOT_SAVED

    @property
    def lifecycle_dir(self) -> Path:
        """Root's own corner of the data partition: the slots' record and the upgrade's staging."""
        return self.data_dir / "lifecycle"


def config_path() -> Path:
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def load_lifecycle_config(path: Path | None = None) -> LifecycleConfig:
    """Read the file; a missing one gives the defaults (an older image, or a test without one)."""
    path = path or config_path()
    if not path.exists():
        return LifecycleConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise LifecycleConfigError(f"cannot read {path}: {error}") from error
    upgrade, node, helper = (table(data, name, path) for name in ("upgrade", "node", "helper"))
    defaults = LifecycleConfig()
    checks = upgrade.get("health_checks", [])
    if (
        not isinstance(checks, list)
        or len(checks) > MAX_CHECKS
        or not all(isinstance(c, str) and c.strip() and len(c) <= MAX_CHECK_LENGTH and "\n" not in c for c in checks)
    ):
        raise LifecycleConfigError(f"{path}: [upgrade] health_checks must be a list of one-line commands")
    timeout = upgrade.get("health_timeout", DEFAULT_HEALTH_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_HEALTH_TIMEOUT:
        raise LifecycleConfigError(f"{path}: [upgrade] health_timeout must be 1 to {MAX_HEALTH_TIMEOUT} seconds")
    budget = node.get("size_budget_mb", defaults.size_budget_mb)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise LifecycleConfigError(f"{path}: [node] size_budget_mb must be a whole number of megabytes")

    def node_path(key: str, default: Path) -> Path:
        return Path(str(node.get(key, default)))

    return LifecycleConfig(
        health_checks=tuple(checks),
        health_timeout=timeout,
        size_budget_mb=budget,
        data_dir=node_path("data_dir", defaults.data_dir),
        state_dir=node_path("state_dir", defaults.state_dir),
        status_file=node_path("status_file", defaults.status_file),
        storage_marker=node_path("storage_marker", defaults.storage_marker),
        firstboot_file=node_path("firstboot_file", defaults.firstboot_file),
        firstboot_seed=node_path("firstboot_seed", defaults.firstboot_seed),
        build_info=node_path("build_info", defaults.build_info),
        agent_user=str(node.get("agent_user", defaults.agent_user)),
        boot_disk=str(node.get("boot_disk", "")),
        booted_slot=str(node.get("booted_slot", "")),
        helper_socket=Path(str(helper.get("socket", defaults.helper_socket))),
    )


def table(data: dict[str, object], name: str, path: Path) -> dict[str, object]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise LifecycleConfigError(f"{path}: [{name}] must be a table")
    return value
