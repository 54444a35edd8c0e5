"""A build booted locally in QEMU: the runner, `appliance boot`, and the selftest."""
