"""kvport's plugin conformance kit: checks that a platform plugin keeps kvport's contracts.

Run it against an installed platform with ``kvport plugins test NAME`` or
``pytest --kvport-device NAME``; a plugin's own test suite runs it with one module::

    KVPORT_DEVICE = "mydevice"
    from kvport.testing.suite import *  # noqa: F401,F403

What it checks (docs/plugins.md, "The conformance kit"): the Platform contract; every torch
attention backend registered for the device against the reference
(`kvport/attention_backends/torch_reference.py`) over a grid of shapes; the worker end to end
on a tiny random-weight Llama the kit builds (greedy tokens against a numpy reference, seeded
sampling, top-k/top-p bounds); and that abort and preemption leak no KV blocks.

Importing this package is cheap (no torch): it is loaded by pytest in every run.
"""
from __future__ import annotations

__all__ = ["run_kit"]


def run_kit(device: str, *, full_grid: bool = False, backends: tuple[str, ...] = (),
            foreign_backends: tuple[str, ...] = (), pytest_args: tuple[str, ...] = ()) -> int:
    """Run the kit against `device` in this process; returns pytest's exit code.
    `foreign_backends` are lent to the device (kvport/testing/foreign.py)."""
    import pytest

    from kvport.testing.pytest_plugin import SUITE_PATH

    import os

    # rootdir next to the suite: short test ids ("suite.py::test_...") from any directory.
    args = [SUITE_PATH, "--kvport-device", device, "-p", "no:cacheprovider",
            "--rootdir", os.path.dirname(SUITE_PATH)]
    if full_grid:
        args.append("--kvport-full-grid")
    for name in backends:
        args += ["--kvport-backend", name]
    for name in foreign_backends:
        args += ["--kvport-foreign-backend", name]
    return int(pytest.main(args + list(pytest_args)))
