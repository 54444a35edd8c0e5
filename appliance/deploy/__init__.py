"""A build put on real machines: flashed to a disk, or served for network boot."""
