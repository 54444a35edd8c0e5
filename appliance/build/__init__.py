"""From a spec to boot artifacts: render templates, run diskimage-builder, pack, write the manifest."""
