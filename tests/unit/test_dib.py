from __future__ import annotations

import io
from pathlib import Path

from appliance.build.dib import ELEMENTS, PhaseFollower, build_invocation, one_build_at_a_time
from appliance.build.mirrors import HostMirrors
from appliance.spec import BREAK_GLASS_USER, parse_spec

HOST = HostMirrors(debian="http://host.example/debian", security="http://host.example/debian-security")


def invocation_for(text: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return build_invocation(
        parse_spec(text, "t"),
        elements_dir=tmp_path / "elements",
        agent_dir=tmp_path / "agent",
        output_prefix=tmp_path / "dib" / "demo",
        mirrors=HOST,
        cache_dir=tmp_path / "cache",
        base_env={"PATH": "/usr/bin", "HOME": "/root"},
    )


def test_command_line_builds_our_elements_and_no_image_of_dibs_own(tmp_path: Path) -> None:
    argv = invocation_for("", tmp_path).argv
    assert argv[0].endswith("disk-image-create")
    # appliance-live makes the squashfs (zstd) and depends on no-final-image: DIB's raw image is dropped.
    assert argv[1:7] == ("-a", "amd64", "-t", "raw", "-o", str(tmp_path / "dib" / "demo"))
    assert argv[-len(ELEMENTS) :] == ELEMENTS
    assert "-p" not in argv


def test_extra_packages_are_passed_with_p(tmp_path: Path) -> None:
    argv = invocation_for('packages = ["tcpdump", "ethtool"]', tmp_path).argv
    assert argv[argv.index("-p") + 1] == "tcpdump,ethtool"


def test_environment_points_dib_at_our_elements_mirrors_and_cache(tmp_path: Path) -> None:
    env = invocation_for('release = "bookworm"\n[ssh]\nuser = "ops"', tmp_path).env
    assert env["ELEMENTS_PATH"] == str(tmp_path / "elements")
    assert env["DIB_RELEASE"] == "bookworm"
    assert env["DIB_DISTRIBUTION_MIRROR"] == HOST.debian
    assert env["DIB_DEBIAN_SECURITY_MIRROR"] == HOST.security
    assert env["DIB_IMAGE_CACHE"] == str(tmp_path / "cache")
    assert env["DIB_DEBOOTSTRAP_CACHE"] == "1" and env["DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE"] == "1"
    assert env["DIB_APPLIANCE_AGENT_SRC"] == str(tmp_path / "agent")
    assert env["DIB_APPLIANCE_AGENT_USER"] == "ops"
    assert env["DIB_APPLIANCE_BREAK_GLASS_USER"] == BREAK_GLASS_USER
    assert env["HOME"] == "/root"


def test_spec_mirrors_override_the_host(tmp_path: Path) -> None:
    env = invocation_for(
        '[mirrors]\ndebian = "http://spec.example/debian"\nsecurity = "http://spec.example/sec"', tmp_path
    ).env
    assert env["DIB_DISTRIBUTION_MIRROR"] == "http://spec.example/debian"
    assert env["DIB_DEBIAN_SECURITY_MIRROR"] == "http://spec.example/sec"


def test_output_paths_follow_dib_naming(tmp_path: Path) -> None:
    invocation = invocation_for("", tmp_path)
    assert invocation.squashfs == tmp_path / "dib" / "demo.squashfs"
    assert invocation.kernel == tmp_path / "dib" / "demo.vmlinuz"
    assert invocation.dpkg_manifest == tmp_path / "dib" / "demo.d" / "dib-manifests" / "dib-manifest-dpkg-demo"


def test_phase_follower_reports_phases_and_keeps_every_line() -> None:
    log = io.StringIO()
    seen: list[tuple[str, str]] = []
    follower = PhaseFollower(log, lambda phase, script: seen.append((phase, script)))
    follower("2026-11-24 22:21:32.300 | dib-run-parts Running /tmp/dib_build.x/hooks/root.d/08-debootstrap")
    follower("2026-11-24 22:21:33.000 | I: Retrieving InRelease")
    follower("2026-11-24 22:23:00.000 | dib-run-parts Running /tmp/in_target.d/install.d/01-package-installs")
    assert seen == [("root.d", "08-debootstrap"), ("install.d", "01-package-installs")]
    assert follower.phase == "install.d"
    assert len(log.getvalue().splitlines()) == 3


def test_builds_sharing_a_cache_take_turns_and_the_waiting_one_says_so(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    lock = tmp_path / "cache" / ".appliance-build.lock"
    lock.parent.mkdir(parents=True)
    # Another build: holds the lock until told to let go.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.readline()", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None and holder.stdout.readline() == b"held\n"
    said: list[str] = []
    got_it = threading.Event()

    def second_build() -> None:
        with one_build_at_a_time(lock, lambda: said.append("waiting")):
            got_it.set()

    thread = threading.Thread(target=second_build)
    thread.start()
    assert not got_it.wait(0.5)  # still waiting while the first one builds
    holder.stdin.write(b"done\n")
    holder.stdin.flush()
    assert got_it.wait(30) and holder.wait(30) == 0
    thread.join()
    assert said == ["waiting"]
    with one_build_at_a_time(lock, lambda: said.append("again")):
        pass
    assert said == ["waiting"]  # nobody held it: no word
