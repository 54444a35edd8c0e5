"""Turning DIB's result into boot artifacts: one module per artifact family."""
