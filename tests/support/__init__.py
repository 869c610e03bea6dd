"""Shared helpers for driftwarden's tests and benchmarks: offline images and test containers."""
