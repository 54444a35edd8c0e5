"""`appliance pxe serve`: the PXE set of a build over HTTP, for iPXE and live-boot to fetch.

Only the set's files are served (kernel, initrd, squashfs, NAME.ipxe), plus
boot.ipxe, a two-line script that sets base-url to this server and chains
NAME.ipxe: hand boot.ipxe out from TFTP (QEMU's built-in TFTP in the tests)
or type `chain http://HOST:PORT/boot.ipxe` at an iPXE prompt.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from appliance.build.pack.pxe import chain_script
from appliance.errors import ApplianceError
from appliance.manifest import ArtifactKind, Manifest

CHAIN_SCRIPT = "boot.ipxe"
PXE_SET = (ArtifactKind.IPXE, ArtifactKind.KERNEL, ArtifactKind.INITRD, ArtifactKind.SQUASHFS)


class PxeError(ApplianceError):
    """The build has no PXE set, or it cannot be served."""


@dataclass(frozen=True)
class PxeSet:
    out_dir: Path
    name: str
    files: tuple[str, ...]


def read_pxe_set(out_dir: Path) -> PxeSet:
    manifest = Manifest.load(out_dir)
    files = tuple(artifact.file for kind in PXE_SET for artifact in manifest.artifacts_of(kind))
    if not manifest.artifacts_of(ArtifactKind.IPXE):
        raise PxeError(f'the build in {out_dir} has no PXE set (add "pxe" to outputs in the spec and rebuild)')
    missing = [name for name in files if not (out_dir / name).is_file()]
    if missing:
        raise PxeError(f"the build in {out_dir} lacks {', '.join(missing)}: rebuild it")
    return PxeSet(out_dir=out_dir, name=manifest.name, files=files)


class PxeHttpServer(ThreadingHTTPServer):
    """Holds what every request needs: the set, the chain script, where to log."""

    def __init__(self, address: tuple[str, int], pxe: PxeSet, log: Callable[[str], None]) -> None:
        self.pxe = pxe
        self.log = log
        self.chain = b""
        super().__init__(address, PxeRequestHandler)


class PxeRequestHandler(SimpleHTTPRequestHandler):
    """Static files of one PXE set and the chain script; nothing else in the directory."""

    server: PxeHttpServer

    def __init__(self, request: socket.socket, client: tuple[str, int], server: PxeHttpServer) -> None:
        super().__init__(request, client, server, directory=str(server.pxe.out_dir))

    def do_GET(self) -> None:
        self.serve(send_body=True)

    def do_HEAD(self) -> None:
        self.serve(send_body=False)

    def serve(self, send_body: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if name == CHAIN_SCRIPT:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(self.server.chain)))
            self.end_headers()
            if send_body:
                self.wfile.write(self.server.chain)
        elif name in self.server.pxe.files:
            if send_body:
                super().do_GET()
            else:
                super().do_HEAD()
        else:
            self.send_error(404, "not part of this PXE set")

    def log_message(self, format: str, *args: object) -> None:
        self.server.log(f"{self.client_address[0]} {format % args}")


def advertised_address(bind: str) -> str:
    """The address to put in URLs: the bound one, or for 0.0.0.0 the one routes leave by."""
    if bind not in ("", "0.0.0.0"):
        return bind
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent by connect()
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostname()


@dataclass
class PxeServer:
    """A running server; `close` stops it."""

    server: PxeHttpServer
    thread: threading.Thread
    base_url: str
    chain_file: Path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_pxe_server(pxe: PxeSet, bind: str, port: int, base_url: str | None, log: Callable[[str], None]) -> PxeServer:
    try:
        server = PxeHttpServer((bind, port), pxe, log)
    except OSError as error:
        raise PxeError(f"cannot listen on {bind or '*'}:{port}: {error.strerror}") from error
    url = base_url or f"http://{advertised_address(bind)}:{server.server_address[1]}/"
    if not url.endswith("/"):
        url += "/"
    chain = chain_script(url, pxe.name)
    server.chain = chain.encode()
    # The same script, as a file to hand out from a TFTP server.
    chain_file = pxe.out_dir / "run" / "pxe" / CHAIN_SCRIPT
    chain_file.parent.mkdir(parents=True, exist_ok=True)
    chain_file.write_text(chain)
    thread = threading.Thread(target=server.serve_forever, name="pxe-http", daemon=True)
    thread.start()
    return PxeServer(server=server, thread=thread, base_url=url, chain_file=chain_file)
