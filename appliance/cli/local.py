"""Verbs that work on this machine: spec, build, boot in QEMU, selftest, flash, PXE serving."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.boot.boot import DEFAULT_DISK_GIB, BootRequest, boot
from appliance.boot.selftest import SelftestError, SelftestOptions, selftest
from appliance.boot.vm import MAX_NICS, VmPaths, stop_recorded_vm
from appliance.build.dib import DEFAULT_CACHE_DIR
from appliance.build.pipeline import build, read_key_files
from appliance.cli.parsing import KEY_HELP, HelpFormatter, Verbs, tcp_port, udp_port, whole_gib
from appliance.deploy.flash import FlashError, flash
from appliance.deploy.pxe_server import CHAIN_SCRIPT, read_pxe_set, start_pxe_server
from appliance.errors import EXIT_FAILED
from appliance.progress import Progress
from appliance.spec import default_spec_text, load_spec

EXIT_OK = 0


def nic_count(text: str) -> int:
    """How many NICs the booted node has, for argparse: 1 to MAX_NICS."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_NICS:
        raise argparse.ArgumentTypeError(f"{text!r}: a node here has 1 to {MAX_NICS} NICs")
    return int(text)


def add_local_verbs(verbs: Verbs) -> None:
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
        "Needs root (DIB uses chroots and loop devices); the full log goes to DIR/build.log.\n"
        "The root image is kept in --cache-dir: a build with the same packages, elements and agent reuses it\n"
        "without running DIB, and only the node's configuration (host name, keys, policy, network) is new.",
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
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="DIB's cache, and the root images built before (default: %(default)s)",
    )
    build_cmd.add_argument(
        "--fresh-base",
        action="store_true",
        help="run DIB for the root image even when the cache holds one of the same inputs (to take package updates)",
    )

    boot_cmd = verbs.add_parser(
        "boot",
        formatter_class=HelpFormatter,
        help="boot a built appliance in QEMU",
        description="Boot DIR's ISO or disk image in QEMU (KVM when it really works here, else TCG),\n"
        "serial console to DIR/run/serial.log,\n"
        "SSH forwarded from a port on 127.0.0.1: --ssh-port, else the last boot's (DIR/run/ssh-port) while it is\n"
        "free, so known_hosts keeps one entry for the node; else any free one.\n"
        "Without --wait the console is shown until Ctrl-C.\n"
        "With --media disk the node's disk is DIR/run/disk.qcow2, copy-on-write over NAME.raw and kept\n"
        "from boot to boot (data and SSH host key survive) until the build changes or --fresh-disk;\n"
        "it names NAME.raw relative to itself, so a copy of DIR boots its own image.\n"
        "With --media pxe QEMU's own DHCP and TFTP hand the NIC's iPXE the chain script, and the PXE set\n"
        "is served over HTTP on 127.0.0.1 (as `appliance pxe serve` does) until the node is ready.\n"
        "With --lan PORT the node gets a second NIC on a network shared by every node booted with the same\n"
        "PORT (QEMU's socket networking: UDP multicast kept to 127.0.0.1, nothing leaves this machine);\n"
        "its MAC stays the same from boot to boot of DIR, and the spec's [network] says what the node does\n"
        "with it (the default configures only the first NIC).",
        epilog="example:\n"
        "  appliance boot out --wait\n"
        "  appliance boot out --media disk --uefi --wait\n"
        "  appliance boot out --media pxe --wait\n"
        "  appliance boot out --nics 2 --wait    # a spec with a [network] bond of both NICs\n"
        "  appliance stop out\n"
        "two nodes on one network:\n"
        "  appliance boot node1 --wait --lan 40400\n"
        "  appliance boot node2 --wait --lan 40400",
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
    boot_cmd.add_argument(
        "--media",
        choices=("iso", "disk", "pxe"),
        default="iso",
        help="boot the ISO, the disk image or the PXE set (default: %(default)s)",
    )
    boot_cmd.add_argument(
        "--disk-size",
        type=whole_gib,
        default=DEFAULT_DISK_GIB,
        metavar="GIB",
        help="size of a new disk; the node grows its data partition into it (default: %(default)s)",
    )
    boot_cmd.add_argument(
        "--extra-disk",
        type=whole_gib,
        default=0,
        metavar="GIB",
        help="attach a second disk, blank when made (DIR/run/extra-disk.qcow2, kept from boot to boot): "
        "a node built with [storage] claim_blank_disk = true keeps its state there",
    )
    boot_cmd.add_argument(
        "--nics",
        type=nic_count,
        default=1,
        metavar="N",
        help=f"NICs on the node's one user-mode network, 1 to {MAX_NICS} (default: %(default)s); with more than "
        "one, each is on a port of QEMU's hub, named nic0, nic1, ... so that `set_link` on DIR/run/qmp.sock "
        "pulls one's cable (a spec's [network] bond of them fails over)",
    )
    boot_cmd.add_argument(
        "--ssh-port",
        type=tcp_port,
        metavar="PORT",
        help="port on 127.0.0.1 forwarded to the node's SSH (default: the last boot's while free, else any)",
    )
    boot_cmd.add_argument(
        "--seed",
        type=Path,
        metavar="FILE",
        help="attach FILE read-only as another disk: a cidata (NoCloud) or config-2 (ConfigDrive) volume "
        "the node takes its host name, keys and network from at boot",
    )
    boot_cmd.add_argument(
        "--lan",
        type=udp_port,
        metavar="PORT",
        help="a second NIC on the network shared by every node booted with this --lan PORT",
    )
    boot_cmd.add_argument(
        "--fresh-disk",
        action="store_true",
        help="start from the image again, dropping the node's data (and empty the extra disk)",
    )

    selftest_cmd = verbs.add_parser(
        "selftest",
        formatter_class=HelpFormatter,
        help="check a build end to end: boot, SSH, a nested guest, agent restart, reboot",
        description="Boot DIR in QEMU and check it as an operator would, printing each step with its time:\n"
        "the host report over SSH, a tiny guest image pushed, an autostart guest created and started\n"
        "inside the node (its console marker seen), a new agent finding it still running; and from\n"
        "the disk image, a shutdown and boot finding the guest running again and the same host key.\n"
        "QEMU is stopped at the end, and the node's disk overlay in DIR/run is made anew.",
        epilog="example:\n  appliance selftest out --key ~/.ssh/id_ed25519",
    )
    selftest_cmd.add_argument("dir", type=Path, help="build directory (built with --authorized-key KEY.pub)")
    selftest_cmd.add_argument("--key", type=Path, help=KEY_HELP)
    selftest_cmd.add_argument(
        "--media",
        choices=("auto", "disk", "iso"),
        default="auto",
        help="boot the disk image (with the reboot check) or the ISO; auto: the disk if built (default)",
    )
    selftest_cmd.add_argument("--boot-timeout", type=float, default=900.0, help="seconds (default: %(default)s)")
    selftest_cmd.add_argument(
        "--guest-timeout", type=float, default=300.0, help="seconds for the nested guest (default: %(default)s)"
    )

    stop = verbs.add_parser(
        "stop",
        formatter_class=HelpFormatter,
        help="stop the QEMU started by `appliance boot --wait`",
        description="Stop the node booted from DIR. By default QEMU ends at once, like pulling the plug;\n"
        "--shutdown first presses the node's power button (ACPI) and waits for it to power off.",
        epilog="example:\n  appliance stop out\n  appliance stop out --shutdown 120",
    )
    stop.add_argument("dir", type=Path, help="build directory")
    stop.add_argument(
        "--shutdown",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask the node to shut down and wait this long before ending QEMU",
    )

    flash_cmd = verbs.add_parser(
        "flash",
        formatter_class=HelpFormatter,
        help="write the disk image to a disk or a file, then read it back to verify",
        description="Write DIR's NAME.raw to TARGET (a disk such as /dev/sdX, or a file), then read it back\n"
        "and compare its sha256 with the manifest's. A target that is mounted, used as swap, or holds the\n"
        "running system is refused. Asks before writing unless --yes; with no terminal to ask on, refuses.",
        epilog="example:\n  appliance flash out /dev/sdX\n  appliance flash out usb-stick.img --yes",
    )
    flash_cmd.add_argument("dir", type=Path, help="build directory (holds manifest.json and NAME.raw)")
    flash_cmd.add_argument("target", type=Path, help="disk device or file to write")
    flash_cmd.add_argument("--yes", action="store_true", help="do not ask before writing")
    init.set_defaults(run=cmd_init)
    check.set_defaults(run=cmd_check)
    build_cmd.set_defaults(run=cmd_build)
    boot_cmd.set_defaults(run=cmd_boot)
    selftest_cmd.set_defaults(run=cmd_selftest)
    stop.set_defaults(run=cmd_stop)
    flash_cmd.set_defaults(run=cmd_flash)
    add_pxe_verbs(verbs)


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
    result = build(spec, args.output, progress, cache_dir=args.cache_dir, fresh_base=args.fresh_base)
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
        media=args.media,
        disk_gib=args.disk_size,
        fresh_disk=args.fresh_disk,
        extra_disk_gib=args.extra_disk,
        ssh_port=args.ssh_port,
        seed=args.seed,
        nics=args.nics,
        lan_port=args.lan,
    )
    result = boot(request)
    if args.wait:
        print(f"ready after {result.seconds_to_ready:.1f}s ({result.accel.accel})")
        print(f"  console log:      {result.paths.console_log}")
        print(f"  stop it:          appliance stop {args.dir}")
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    options = SelftestOptions(
        out_dir=args.dir,
        key=args.key,
        media=args.media,
        boot_timeout=args.boot_timeout,
        guest_timeout=args.guest_timeout,
    )
    try:
        report = selftest(options, sys.stdout)
    except SelftestError as error:
        print(f"appliance: selftest failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    total = sum(seconds for _, seconds in report.steps)
    print(f"selftest passed: {len(report.steps)} steps in {total:.0f}s")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    if stop_recorded_vm(VmPaths(args.dir / "run"), args.shutdown):
        print(f"stopped the appliance running from {args.dir}")
    else:
        print(f"no appliance running from {args.dir}")
    return EXIT_OK


def cmd_flash(args: argparse.Namespace) -> int:
    def confirm(question: str) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise FlashError(f"refusing to write {args.target} without --yes: there is no terminal to ask on")
        return input(f"{question} Type yes: ").strip() == "yes"

    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    with progress.step(f"write {args.dir} to {args.target}"):
        result = flash(
            args.dir,
            args.target,
            confirm,
            lambda done, size: progress.detail(f"{done * 100 // max(size, 1)}% of {size / 1e6:.0f} MB"),
        )
    print(f"wrote {result.image.name} to {result.target} ({result.size_bytes / 1e6:.0f} MB in {result.seconds:.0f}s)")
    print(f"  read back: sha256 {result.sha256} matches the manifest")
    return EXIT_OK


def add_pxe_verbs(verbs: Verbs) -> None:
    pxe = verbs.add_parser(
        "pxe",
        formatter_class=HelpFormatter,
        help="network boot: serve a build's PXE set over HTTP",
        description="Serve DIR's PXE set (NAME.ipxe, kernel, initrd, squashfs) over HTTP until Ctrl-C.\n"
        "DHCP and TFTP stay with your own infrastructure: point them (or an iPXE prompt) at boot.ipxe,\n"
        "which sets base-url to this server and chains NAME.ipxe. The same boot.ipxe is written to\n"
        "DIR/run/pxe/ for a TFTP server to hand out.",
        epilog="example:\n  appliance pxe serve out --http-port 8080\n"
        "  # at an iPXE prompt, or in your DHCP server's iPXE script:\n"
        "  chain http://BOOT-SERVER:8080/boot.ipxe",
    )
    pxe_verbs = pxe.add_subparsers(dest="pxe_verb", required=True, metavar="VERB")
    serve = pxe_verbs.add_parser("serve", help="serve the PXE set until Ctrl-C")
    serve.set_defaults(run=cmd_pxe)
    serve.add_argument("dir", type=Path, help="build directory (holds manifest.json and NAME.ipxe)")
    serve.add_argument("--http-port", type=int, default=8080, help="0 picks a free port (default: %(default)s)")
    serve.add_argument("--bind", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--base-url", help="URL the servers being booted reach this one by (default: http://ADDRESS:PORT/)"
    )


def cmd_pxe(args: argparse.Namespace) -> int:
    pxe = read_pxe_set(args.dir)
    server = start_pxe_server(pxe, args.bind, args.http_port, args.base_url, lambda line: print(line, flush=True))
    print(f"serving {', '.join(pxe.files)} from {args.dir}", flush=True)
    print(f"boot URL: {server.base_url}{CHAIN_SCRIPT}  (iPXE: chain {server.base_url}{CHAIN_SCRIPT})", flush=True)
    print(f"for TFTP: {server.chain_file}", flush=True)
    try:
        server.thread.join()
    finally:
        server.close()
    return EXIT_OK
