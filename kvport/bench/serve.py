"""`kvport bench serve`: sweep concurrency against one or more OpenAI-compatible servers.

Workload W2 (/work/shared/benchmarks.md): prompts of N random common words, fixed output
length with ignore_eos, greedy, streamed. Several servers are compared in one run: each sweep
point runs on every server in turn before the next point starts, so slow drift of a shared
machine hits all servers alike, and the table ends with subject/peer ratios.

    python -m kvport.bench serve --peer kvport=http://127.0.0.1:8000/v1 \\
        --launch-llama-server ~/.cache/kvport-peers/llama-server:MODEL.gguf:8 \\
        --output-json results.json --plot results.png
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from kvport.bench import report
from kvport.bench.client import (CompletionRequest, first_model, normalize_base_url,
                                 run_requests)
from kvport.bench.llama_server import LlamaServer, LlamaServerSpec
from kvport.bench.machine import machine_info, now_iso
from kvport.bench.metrics import summarize
from kvport.bench.prompts import new_run_id, word_prompts

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


@dataclass
class Server:
    """One benchmarked endpoint and what the warm-up learned about it."""
    name: str
    base_url: str
    model: str = ""
    usage_in_stream: bool | None = None      # did include_usage produce a usage chunk?
    token_count_source: str = "usage"        # "usage", or "streamed_chunks" (fallback)
    ignore_eos_honoured: bool | None = None  # did the warm-up get all max_tokens tokens?
    launch_command: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def add_bench_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="benchmark OpenAI-compatible servers (W2 sweep)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)
    p.set_defaults(func=run_bench_serve)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("servers")
    g.add_argument("--base-url", default=None,
                   help=f"server to benchmark (default {DEFAULT_BASE_URL} when no --peer or "
                        "--launch-llama-server is given); '/v1' is appended if missing")
    g.add_argument("--name", default="kvport", help="label of --base-url's server")
    g.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                   help="another server to run the same sweep on (repeatable)")
    g.add_argument("--launch-llama-server", action="append", default=[],
                   metavar="BIN:GGUF[:PARALLEL]",
                   help="start llama-server with -np PARALLEL (default 8) for this run, named "
                        "llama.cpp-npPARALLEL; repeatable; empty BIN = the cached build")
    g.add_argument("--llama-ctx", type=int, default=16384,
                   help="llama-server -c, shared by its slots (default 16384)")
    g.add_argument("--llama-threads", type=int, default=2, help="llama-server -t (default 2)")
    g.add_argument("--llama-arg", action="append", default=[],
                   help="extra llama-server argument (repeatable, e.g. --llama-arg=--mlock)")
    g.add_argument("--model", default=None,
                   help="model name sent to every server (default: each server's first "
                        "GET /v1/models entry)")
    g.add_argument("--subject", default=None,
                   help="server whose ratios to the others are printed (default: the first)")
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-words", type=int, default=128)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--concurrency", default="1,4,8,16,32",
                   help="comma list; one sweep point each (default 1,4,8,16,32)")
    w.add_argument("--num-requests", type=int, default=None,
                   help="requests per point (default max(4 * concurrency, 16))")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--run-id", default=None,
                   help="prompt salt; default fresh per run so no server reuses a prefix "
                        "cache from an earlier run (pass one to replay a run's prompts)")
    o = p.add_argument_group("output")
    o.add_argument("--output-json", default=None, metavar="PATH")
    o.add_argument("--plot", default=None, metavar="PATH.png")


def parse_concurrency(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency needs positive integers, got {text!r}")
    return values


def parse_peer(text: str) -> Server:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise ValueError(f"--peer expects NAME=URL, got {text!r}")
    return Server(name=name, base_url=normalize_base_url(url))


def requests_per_point(args: argparse.Namespace, concurrency: int) -> int:
    return args.num_requests or max(4 * concurrency, 16)


def warm_up(server: Server, args: argparse.Namespace, run_id: str) -> None:
    """One full-length request: warms the server and learns whether it streams usage and
    honours ignore_eos. A server without usage is then measured by counting text chunks."""
    prompt = word_prompts(1, args.prompt_words, args.seed, run_id, tag="warmup")[0]
    request = CompletionRequest(prompt, args.output_len)
    (result,), _ = asyncio.run(run_requests(server.base_url, server.model, [request], 1,
                                            count_chunks_as_tokens=True))
    if not result.success:
        raise SystemExit(f"warm-up request to {server.name} ({server.base_url}) failed: "
                           f"{result.error}")
    server.usage_in_stream = result.usage_completion_tokens is not None
    if not server.usage_in_stream:
        server.token_count_source = "streamed_chunks"
        server.notes.append("no usage chunk with stream_options.include_usage: output tokens "
                            "counted as streamed text chunks (one token per chunk)")
    server.ignore_eos_honoured = result.output_tokens >= args.output_len
    if not server.ignore_eos_honoured:
        server.notes.append(f"warm-up produced {result.output_tokens} < {args.output_len} "
                            "tokens: ignore_eos looks ignored")
    if result.usage_completion_tokens is not None and \
            result.usage_completion_tokens != result.text_chunks:
        server.notes.append(f"warm-up: usage says {result.usage_completion_tokens} tokens, "
                            f"{result.text_chunks} non-empty text chunks streamed")


def run_point(server: Server, args: argparse.Namespace, concurrency: int,
              prompts: list[str]) -> dict[str, Any]:
    requests = [CompletionRequest(p, args.output_len) for p in prompts]
    # The 1-minute load average before the point: a noise flag on shared machines (anything
    # well above the server's own thread count means someone else was using the cores).
    load_1m = os.getloadavg()[0]
    results, duration = asyncio.run(run_requests(
        server.base_url, server.model, requests, concurrency,
        count_chunks_as_tokens=server.token_count_source == "streamed_chunks"))
    point = {"server": server.name, "concurrency": concurrency, "loadavg_1m_before": load_1m,
             "loadavg_1m_after": os.getloadavg()[0]}
    point.update(summarize(results, duration, expected_output_tokens=args.output_len))
    return point


def collect_servers(args: argparse.Namespace) -> list[Server]:
    servers = [parse_peer(text) for text in args.peer]
    if args.base_url or (not servers and not args.launch_llama_server):
        servers.insert(0, Server(args.name, normalize_base_url(args.base_url or DEFAULT_BASE_URL)))
    return servers


def build_document(args: argparse.Namespace, run_id: str, concurrencies: list[int],
                   servers: list[Server], points: list[dict], ratios: list[dict]) -> dict:
    """The --output-json document: metadata, one entry per (server, point), ratios."""
    return {
        "metadata": {"date": now_iso(), "machine": machine_info(), "run_id": run_id,
                     "workload": {"name": "W2", "prompt_words": args.prompt_words,
                                  "output_len": args.output_len, "seed": args.seed,
                                  "concurrency": concurrencies,
                                  "num_requests": {str(c): requests_per_point(args, c)
                                                   for c in concurrencies}},
                     "base_url": servers[0].base_url, "model": servers[0].model,
                     "servers": [asdict(s) for s in servers]},
        "results": points,
        "ratios": ratios,
    }


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM would end Python without unwinding; turn it into SystemExit so launched
    llama-servers are stopped by their context managers."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def run_bench_serve(args: argparse.Namespace) -> int:
    """Entry point of `kvport bench serve`; returns the exit code (1 if any request failed)."""
    concurrencies = parse_concurrency(args.concurrency)
    _exit_cleanly_on_sigterm()
    run_id = args.run_id or new_run_id()
    servers = collect_servers(args)
    with contextlib.ExitStack() as stack:
        for text in args.launch_llama_server:
            spec = LlamaServerSpec.parse(text)
            launched = LlamaServer(spec, ctx_size=args.llama_ctx, threads=args.llama_threads,
                                   extra_args=list(args.llama_arg))
            stack.enter_context(launched)
            print(f"started {spec.name}: {' '.join(launched.command)} (log {launched.log_path})",
                  file=sys.stderr)
            servers.append(Server(spec.name, launched.base_url,
                                  launch_command=launched.command))
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise SystemExit(f"server names must be unique, got {names}")
        for server in servers:
            server.model = args.model or first_model(server.base_url)
            warm_up(server, args, run_id)
            print(f"{server.name}: {server.base_url} model={server.model} "
                  f"usage_in_stream={server.usage_in_stream} "
                  f"ignore_eos_honoured={server.ignore_eos_honoured}", file=sys.stderr)

        points = []
        for concurrency in concurrencies:
            # Same prompts for every server at a point; new prompts for every point.
            prompts = word_prompts(requests_per_point(args, concurrency), args.prompt_words,
                                   args.seed, run_id, tag=f"c{concurrency}")
            for server in servers:
                point = run_point(server, args, concurrency, prompts)
                points.append(point)
                print(f"  {server.name} c={concurrency}: "
                      f"{point['output_throughput']:.1f} out tok/s, "
                      f"TPOT p50 {report._fmt(point['tpot_ms']['p50'], 2)} ms, "
                      f"{point['failed']} failed", file=sys.stderr, flush=True)
                if args.output_json:   # partial results survive an interrupted sweep
                    report.write_json(args.output_json, build_document(
                        args, run_id, concurrencies, servers, points,
                        report.compute_ratios(points, args.subject or servers[0].name)))

    subject = args.subject or servers[0].name
    ratios = report.compute_ratios(points, subject)
    print(report.format_table(points))
    if ratios:
        print()
        print(report.format_ratios(ratios))
    for server in servers:
        for note in server.notes:
            print(f"note ({server.name}): {note}")
    document = build_document(args, run_id, concurrencies, servers, points, ratios)
    if args.output_json:
        report.write_json(args.output_json, document)
    if args.plot:
        report.write_plot(args.plot, points, title=f"W2 ({args.prompt_words} words in, "
                                                    f"{args.output_len} out)")
    return 1 if any(p["failed"] for p in points) else 0
