"""The plugin commands of `kvport`:

    kvport plugins [--json]                       what is installed, available, and why not
    kvport plugins test NAME [--full-grid] [--backend B] [--foreign-backend F]
                             [--pytest-args ARGS]
                                                  the conformance kit against platform NAME
    kvport plugin new NAME [--dir D]              a ready plugin package to start from
"""
from __future__ import annotations

import argparse
import shlex
import sys


def register_plugin_commands(commands) -> None:
    """Add `plugins` and `plugin` to the `kvport` subcommands."""
    plugins = commands.add_parser(
        "plugins", help="list installed plugins, or test one with the conformance kit",
        description="List installed kvport plugins: distribution, plugin API range, devices "
                    "(available here or why not) and attention backends.")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=run_plugins)
    actions = plugins.add_subparsers(dest="plugins_command", metavar="ACTION")
    test = actions.add_parser(
        "test", help="run the conformance kit against an installed platform",
        description="Run kvport's conformance kit (kvport.testing) against platform NAME: the "
                    "platform contract, every attention backend registered for it against "
                    "the torch reference, the worker end to end, KV block leaks.")
    test.add_argument("name", help="device type or platform name, e.g. cpu, cuda")
    test.add_argument("--full-grid", action="store_true",
                      help="sweep every head size, GQA ratio, block size and dtype (slow)")
    test.add_argument("--backend", action="append", default=[],
                      help="check only this attention backend (repeatable)")
    test.add_argument("--foreign-backend", action="append", default=[], metavar="BACKEND",
                      help="check this attention backend, registered for another device, on "
                           "NAME's torch device (repeatable; e.g. `kvport plugins test cpu "
                           "--foreign-backend hpu_flat` proves kvport-gaudi's torch code on "
                           "the CPU); without --backend only the foreign ones are checked")
    test.add_argument("--seed", type=int, help="reuse the seed a failure report names")
    test.add_argument("--pytest-args", default="", metavar="ARGS",
                      help="more arguments for pytest, in one string: --pytest-args='-x -k "
                           "attention'")
    test.set_defaults(func=run_plugins_test)

    plugin = commands.add_parser("plugin", help="create a new plugin package")
    plugin_actions = plugin.add_subparsers(dest="plugin_command", metavar="ACTION",
                                           required=True)
    new = plugin_actions.add_parser(
        "new", help="write a ready-to-install plugin package",
        description="Write kvport-NAME/: a pyproject with the entry point, a Platform "
                    "subclass, an attention backend registration, a worker and a test that "
                    "runs the conformance kit. It installs and passes the kit as written "
                    "(computing on the CPU); then replace the marked parts with your device's.")
    new.add_argument("name", help="device name: lowercase letters, digits and _ (e.g. npu)")
    new.add_argument("--dir", default=".", help="where to create kvport-NAME/ (default: .)")
    new.set_defaults(func=run_plugin_new)


def run_plugins(args: argparse.Namespace) -> int:
    from kvport.api.plugins_table import print_plugins
    return print_plugins(as_json=args.json)


def run_plugins_test(args: argparse.Namespace) -> int:
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("kvport: error: the conformance kit runs on pytest: `pip install pytest`",
              file=sys.stderr)
        return 2
    from kvport.testing import run_kit

    extra = shlex.split(args.pytest_args)
    if args.seed is not None:
        extra += ["--kvport-seed", str(args.seed)]
    return run_kit(args.name, full_grid=args.full_grid, backends=tuple(args.backend),
                   foreign_backends=tuple(args.foreign_backend), pytest_args=tuple(extra))


def run_plugin_new(args: argparse.Namespace) -> int:
    from kvport.platforms.scaffold import ScaffoldError, write_plugin

    try:
        path = write_plugin(args.name, args.dir)
    except ScaffoldError as exc:
        print(f"kvport: error: {exc}", file=sys.stderr)
        return 2
    print(f"created {path}\n"
          f"next: pip install -e {path}   then   kvport plugins test {args.name}\n"
          f"      (or run pytest in {path}: its tests/ runs the conformance kit)")
    return 0
