"""`python -m kvport.bench serve|throughput ...`: the same commands as `kvport bench ...`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from kvport.bench.serve import add_bench_serve_parser
    from kvport.bench.throughput import add_bench_throughput_parser

    parser = argparse.ArgumentParser(prog="python -m kvport.bench")
    commands = parser.add_subparsers(dest="bench_command", metavar="{serve,throughput}")
    commands.required = True
    add_bench_serve_parser(commands)
    add_bench_throughput_parser(commands)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
