"""The node's image store: images streamed in through the connection, listed, deleted.

Each image's kind (disk, iso, kernel, initrd: media.py) is read from its first
bytes once it is in, from the file, so nothing beyond the stream's chunk is held.

An import writes to a private partial file while hashing; only a complete
upload with the stated size and sha256 is renamed into place, so a broken or
mismatched upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, BinaryIO

from appliance.agent.crashpoints import crash_point
from appliance.agent.errors import AgentError, ErrorCode, image_exists, image_not_found
from appliance.agent.guests import Hypervisor
from appliance.agent.kept import list_kept
from appliance.agent.media import detect_kind, image_kind
from appliance.agent.model import check_name
from appliance.agent.store import Store

CHUNK = 1 << 20
MAX_IMAGE_BYTES = 1 << 40
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
PARTIAL_PREFIX = ".partial-"


def receive_image(
    host: Hypervisor, store: Store, name: str, size: int, sha256: str, stream: BinaryIO
) -> dict[str, Any]:
    """Read exactly `size` bytes of image data from `stream` into the store as `name`."""
    host.images_dir.mkdir(parents=True, exist_ok=True)
    target = host.images_dir / check_name(name)
    partial = host.images_dir / f"{PARTIAL_PREFIX}{os.getpid()}-{name}"
    digest = hashlib.sha256()
    received = 0
    try:
        with partial.open("wb") as out:
            while received < size:
                chunk = stream.read(min(CHUNK, size - received))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if received != size:
            raise AgentError(ErrorCode.UPLOAD_INCOMPLETE, f"the connection ended after {received} of {size} bytes")
        if digest.hexdigest() != sha256:
            raise AgentError(ErrorCode.CHECKSUM_MISMATCH, f"sha256 of the upload is {digest.hexdigest()}, not {sha256}")
        if target.exists():
            raise image_exists(name)
        # The row first: a file in the store always has its row (repair.py relies on it).
        store.add_image(name, size, sha256, detect_kind(partial))
        crash_point("image-import:row")
        try:
            # link, not rename: it fails instead of replacing an image that appeared meanwhile.
            os.link(partial, target)
        except FileExistsError as error:
            store.remove_image(name)
            raise image_exists(name) from error
        crash_point("image-import:linked")
    finally:
        partial.unlink(missing_ok=True)
    return {"name": name, "size_bytes": size, "sha256": sha256}


def list_images(host: Hypervisor, store: Store) -> list[dict[str, object]]:
    """Every image with its kind; rows of older agents get theirs now (media.image_kind keeps it)."""
    listed = store.images()
    for image in listed:
        if not image["kind"]:
            name = str(image["name"])
            try:
                image["kind"] = image_kind(store, host.images_dir, name)
            except AgentError:  # its file went with a delete cut short: repair.py removes the row
                image["kind"] = ""
    return listed


def delete_image(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    users = [spec.name for spec in store.guests() if name in spec.images_used()]
    if users:
        raise AgentError(ErrorCode.IMAGE_IN_USE, f"image {name!r} is used by guest(s) {', '.join(users)}")
    # Kept disks are copy-on-write over their base images too: kept.restore needs them.
    kept = [entry["kept"] for entry in list_kept(host) if name in entry["images"]]
    if kept:
        raise AgentError(
            ErrorCode.IMAGE_IN_USE,
            f"image {name!r} is under the kept disks of {', '.join(kept)} (kept.purge them first)",
        )
    if name not in {image["name"] for image in store.images()}:
        raise image_not_found(name)
    # The file first, then the row: a file in the store always has its row.
    (host.images_dir / check_name(name)).unlink(missing_ok=True)
    crash_point("image-delete:unlinked")
    store.remove_image(name, missing_ok=True)
    return {"name": name, "deleted": True}
