"""The conformance kit's pytest plugin (entry point ``pytest11: kvport``).

pytest loads it in every run of every project where kvport is installed, so it is inert and
cheap: it adds the ``--kvport-*`` options and nothing else, imports no torch, defines no
fixtures. Only ``--kvport-device NAME`` does something: with no test paths on the command
line, the run collects the kit (`kvport/testing/suite.py`) instead of the project's tests::

    pytest --kvport-device cpu                 # the kit against the cpu platform
    pytest --kvport-device cuda --kvport-full-grid
    kvport plugins test cuda                   # the same through the CLI

With explicit paths, those run, and any module that star-imports the kit
(``from kvport.testing.suite import *``, as the scaffold's test does) checks the device named
by ``--kvport-device``, else its own ``KVPORT_DEVICE`` constant.
"""
from __future__ import annotations

import os

import pytest

SUITE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvport", "kvport plugin conformance kit")
    group.addoption("--kvport-device", metavar="NAME", default=None,
                    help="run kvport's conformance kit against this platform (device type or "
                         "platform name), e.g. cpu or cuda")
    group.addoption("--kvport-full-grid", action="store_true", default=False,
                    help="check attention backends over the full grid of head sizes, GQA "
                         "ratios, block sizes, dtypes and windows (slow) instead of the "
                         "small default one")
    group.addoption("--kvport-backend", metavar="NAME", action="append", default=[],
                    help="check only this attention backend (repeatable; default: every "
                         "backend registered for the device)")
    group.addoption("--kvport-foreign-backend", metavar="NAME", action="append", default=[],
                    help="also check this attention backend, registered for another device, "
                         "on the device under test (repeatable): proves a backend's torch "
                         "code, e.g. on the CPU, before its own hardware is reachable; with "
                         "no --kvport-backend, only the foreign backends are checked")
    group.addoption("--kvport-seed", metavar="N", type=int, default=None,
                    help="seed of the kit's random inputs (default: fresh each run; a "
                         "failure report names the seed to reproduce it)")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("kvport_device", None):
        return
    # No paths given: the run is the kit, not the project's own test suite.
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [SUITE_PATH]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """Name the device and the seed, so any failure can be rerun exactly."""
    if not config.getoption("kvport_device", None):
        return None
    from kvport.testing.target import kit_options
    options = kit_options(config)
    foreign = (f", foreign backends {', '.join(options.foreign_backends)}"
               if options.foreign_backends else "")
    return [f"kvport conformance kit: device {options.device}, seed {options.seed}"
            f"{', full grid' if options.full_grid else ''}{foreign}"]
