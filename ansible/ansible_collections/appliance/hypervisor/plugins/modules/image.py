#!/usr/bin/python
"""The image module: an image in an appliance node's image store."""

from __future__ import annotations

DOCUMENTATION = r"""
module: image
short_description: Images in an appliance node's image store
version_added: 0.1.0
description:
  - Pushes a local file (on the controller) into the node's image store, or removes an image from it.
  - The file's sha256 is compared with the node's (C(image.list)); the file is sent only when the node has no image
    of that name, and the node checks the sha256 of what it received.
  - An image of the same name with another sha256 is left alone and the task fails (code C(image_exists)), unless
    O(force) is set; then the node's image is deleted and the file pushed in its place. A guest that uses the image
    (its disks are copy-on-write over it) keeps the node from deleting it (code C(image_in_use)).
extends_documentation_fragment:
  - appliance.hypervisor.node
  - appliance.hypervisor.node.attributes
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
    details: The file's sha256 is computed and compared; nothing is sent or deleted.
  diff_mode:
    support: full
    details: The image's name, size and sha256 before and after.
options:
  name:
    description: The image's name in the store (1-63 letters, digits, C(_), C(.), C(-)).
    type: str
    required: true
  src:
    description: The image file on the controller. Needed with O(state=present).
    type: path
  state:
    description: V(present) to have the file's content under O(name), V(absent) to have no image of that name.
    type: str
    choices: [present, absent]
    default: present
  force:
    description: Replace an image of the same name whose sha256 differs from the file's (delete, then push).
    type: bool
    default: false
seealso:
  - module: appliance.hypervisor.guest
author:
  - The appliance project (!UNKNOWN)
"""

EXAMPLES = r"""
- name: The base image on every node
  appliance.hypervisor.image:
    name: debian-13
    src: images/debian-13.qcow2

- name: A rebuilt image replaces the old one (no guest may use it)
  appliance.hypervisor.image:
    name: debian-13
    src: images/debian-13.qcow2
    force: true

- name: No longer wanted
  appliance.hypervisor.image:
    name: debian-12
    state: absent
"""

RETURN = r"""
image:
  description: The node's entry for the image after the task (predicted in check mode).
  returned: when the image is present after the task
  type: dict
  sample: {name: debian-13, size_bytes: 1048576, sha256: 9f86d0..., created: 1767225600}
sha256:
  description: The sha256 of O(src).
  returned: with O(state=present)
  type: str
replaced:
  description: A different image of the same name was deleted for the file (O(force)).
  returned: with O(state=present)
  type: bool
code:
  description: The failure's stable code (the agent's, or the client's such as C(connection_failed)).
  returned: failed
  type: str
  sample: image_in_use
details:
  description: The agent's error data.
  returned: failed
  type: dict
"""

import hashlib
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.appliance.hypervisor.plugins.module_utils.node import (
    ModuleFailure,
    NodeSession,
    node_argument_spec,
    run_module,
)

CHUNK = 1 << 20

ARGUMENT_SPEC = node_argument_spec(
    name={"type": "str", "required": True},
    src={"type": "path"},
    state={"type": "str", "default": "present", "choices": ["present", "absent"]},
    force={"type": "bool", "default": False},
)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as source:
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
    except OSError as error:
        raise ModuleFailure("usage", f"cannot read {path}: {error.strerror}") from error
    return digest.hexdigest()


def diff_entry(image: dict[str, Any] | None) -> dict[str, Any]:
    return {} if image is None else {key: image.get(key) for key in ("name", "size_bytes", "sha256")}


def run(module: AnsibleModule, session: NodeSession) -> dict[str, Any]:
    name: str = module.params["name"]
    images = {image["name"]: image for image in session.call("image.list", idempotent=True)}
    before = images.get(name)
    result: dict[str, Any] = {"changed": False}
    if module.params["state"] == "absent":
        after = None
        if before is not None:
            result["changed"] = True
            if not module.check_mode:
                session.call("image.delete", {"name": name})
    else:
        src = Path(module.params["src"])
        session.check_image_file(src, name)
        sha256 = file_sha256(src)
        result.update(sha256=sha256, replaced=False)
        after = before
        if before is None or before["sha256"] != sha256:
            if before is not None and not module.params["force"]:
                raise ModuleFailure(
                    "image_exists",
                    f"the node has an image {name!r} with sha256 {before['sha256']}, {src} has {sha256}: "
                    "give force=true to replace it (no guest may use it), or another name",
                    sha256=before["sha256"],
                )
            result.update(changed=True, replaced=before is not None)
            after = {"name": name, "size_bytes": src.stat().st_size, "sha256": sha256}
            if not module.check_mode:
                if before is not None:
                    session.call("image.delete", {"name": name})
                session.push_image(src, name)
                listed = {image["name"]: image for image in session.call("image.list", idempotent=True)}
                after = listed.get(name)
        if after is not None:
            result["image"] = after
    if module._diff:
        result["diff"] = {"before": diff_entry(before), "after": diff_entry(after)}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("state", "present", ["src"])],
        supports_check_mode=True,
    )
    run_module(module, lambda session: run(module, session))


if __name__ == "__main__":
    main()
