"""`kvport bench serve` (online, any OpenAI-compatible server) and `kvport bench throughput`
(offline, `kvport.LLM`). The CLI calls `register_bench_commands(subparsers)`."""
from __future__ import annotations


def register_bench_commands(subparsers) -> None:
    """Add `bench` with its `serve` and `throughput` sub-commands; each sets `func`."""
    from kvport.bench.serve import add_bench_serve_parser
    from kvport.bench.throughput import add_bench_throughput_parser

    bench = subparsers.add_parser("bench", help="benchmark a server (serve) or the engine "
                                               "offline (throughput)")
    commands = bench.add_subparsers(dest="bench_command", metavar="{serve,throughput}")
    commands.required = True
    add_bench_serve_parser(commands)
    add_bench_throughput_parser(commands)


__all__ = ["register_bench_commands"]
