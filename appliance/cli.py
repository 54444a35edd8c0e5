"""The `appliance` command: argument parsing and printing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance import __version__
from appliance.boot import BootRequest, boot
from appliance.build import MissingToolsError, build, read_key_files
from appliance.dib import DEFAULT_CACHE_DIR, BuildError
from appliance.pack.budget import BudgetError
from appliance.pack.live import PackError
from appliance.progress import Progress
from appliance.qemu import QemuError, VmPaths, stop_recorded_vm
from appliance.run import CommandError
from appliance.spec import SpecError, default_spec_text, load_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        formatter_class=HelpFormatter,
        description="Build a minimal hypervisor appliance image (kernel, KVM, QEMU, agent) and boot it.",
        epilog="example:\n"
        "  appliance init appliance.toml\n"
        "  appliance build appliance.toml -o out --authorized-key ~/.ssh/id_ed25519.pub\n"
        "  appliance boot out --wait",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser(
        "init",
        formatter_class=HelpFormatter,
        help="write a commented starter appliance.toml",
        epilog="example:\n  appliance init appliance.toml",
    )
    init.add_argument(
        "path", type=Path, nargs="?", default=Path("appliance.toml"), help="where to write it (default: %(default)s)"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    check = verbs.add_parser(
        "check",
        formatter_class=HelpFormatter,
        help="validate a spec without building",
        epilog="example:\n  appliance check appliance.toml",
    )
    check.add_argument("spec", type=Path, nargs="?", help="spec file (default: the built-in default spec)")

    build_cmd = verbs.add_parser(
        "build",
        formatter_class=HelpFormatter,
        help="build the appliance image into a directory",
        description="Build kernel, initrd, squashfs root and a hybrid ISO with diskimage-builder, plus manifest.json.\n"
        "Needs root (DIB uses chroots and loop devices); the full log goes to DIR/build.log.",
        epilog="example:\n  appliance build appliance.toml -o out --authorized-key ~/.ssh/id_ed25519.pub",
    )
    build_cmd.add_argument("spec", type=Path, nargs="?", help="spec file (default: the built-in default spec)")
    build_cmd.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory for the artifacts"
    )
    build_cmd.add_argument(
        "--authorized-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBKEY_FILE",
        help="add the operator public keys in this file to the spec's (repeatable)",
    )
    build_cmd.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="DIB image cache (default: %(default)s)"
    )

    boot_cmd = verbs.add_parser(
        "boot",
        formatter_class=HelpFormatter,
        help="boot a built appliance in QEMU",
        description="Boot DIR's ISO in QEMU (KVM when it really works here, else TCG),\n"
        "serial console to DIR/run/serial.log,\n"
        "SSH forwarded to a free port on 127.0.0.1. Without --wait the console is shown until Ctrl-C.",
        epilog="example:\n  appliance boot out --wait\n  appliance stop out",
    )
    boot_cmd.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    boot_cmd.add_argument("--wait", action="store_true", help="return once the node is ready, leaving QEMU running")
    boot_cmd.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for ready (default: %(default)s)"
    )
    boot_cmd.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator (default: %(default)s)"
    )
    boot_cmd.add_argument("--uefi", action="store_true", help="boot with UEFI firmware (OVMF) instead of SeaBIOS")
    boot_cmd.add_argument("--memory", type=int, default=2048, metavar="MB", help="guest memory (default: %(default)s)")
    boot_cmd.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default: %(default)s)")

    stop = verbs.add_parser(
        "stop",
        formatter_class=HelpFormatter,
        help="stop the QEMU started by `appliance boot --wait`",
        epilog="example:\n  appliance stop out",
    )
    stop.add_argument("dir", type=Path, help="build directory")
    return parser


def cmd_init(args: argparse.Namespace) -> int:
    if args.path.exists() and not args.force:
        print(f"appliance: {args.path} exists; use --force to overwrite", file=sys.stderr)
        return EXIT_FAILED
    args.path.write_text(default_spec_text())
    print(f"wrote {args.path}; edit it, then: appliance build {args.path} -o out")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    print(f"{args.spec or 'default spec'}: ok ({spec.name}, {spec.release}, sha256 {spec.digest()[:12]})")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec).with_extra_keys(read_key_files(args.authorized_key))
    if not spec.ssh.authorized_keys:
        print(
            "appliance: warning: no operator SSH keys; nobody will be able to log in (use --authorized-key)",
            file=sys.stderr,
        )
    progress = Progress(sys.stdout, interactive=sys.stdout.isatty())
    result = build(spec, args.output, progress, cache_dir=args.cache_dir)
    print(f"built in {result.seconds:.0f}s:")
    for path in result.artifacts:
        print(f"  {path}  {path.stat().st_size / 1e6:.1f} MB")
    print(f"  {result.manifest_path}")
    return EXIT_OK


def cmd_boot(args: argparse.Namespace) -> int:
    request = BootRequest(
        out_dir=args.dir,
        wait=args.wait,
        timeout=args.timeout,
        accel=args.accel,
        firmware="uefi" if args.uefi else "bios",
        memory_mb=args.memory,
        cpus=args.cpus,
    )
    result = boot(request)
    if args.wait:
        print(f"ready after {result.seconds_to_ready:.1f}s ({result.accel.accel})")
        print(f"  console log:      {result.paths.serial_log}")
        print(f"  stop it:          appliance stop {args.dir}")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    if stop_recorded_vm(VmPaths(args.dir / "run")):
        print(f"stopped the appliance running from {args.dir}")
    else:
        print(f"no appliance running from {args.dir}")
    return EXIT_OK


COMMANDS = {"init": cmd_init, "check": cmd_check, "build": cmd_build, "boot": cmd_boot, "stop": cmd_stop}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except SpecError as error:
        print(f"appliance: invalid spec: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (BuildError, BudgetError, MissingToolsError, PackError, QemuError, CommandError) as error:
        print(f"appliance: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
