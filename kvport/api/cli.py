"""The `kvport` command: serve, plugins (list, test), plugin new, bench, version."""
from __future__ import annotations

import argparse
import logging
import sys

from kvport.core.config import ConfigError, EngineConfig

# argparse dest -> EngineConfig field, for the engine options `serve` and `bench` share.
ENGINE_OPTIONS = {
    "device": "device", "dtype": "dtype", "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
    "block_size": "block_size", "kv_cache_memory": "kv_cache_memory",
    "gpu_memory_utilization": "gpu_memory_utilization", "num_blocks": "num_blocks",
    "max_waiting_requests": "max_waiting_requests", "attention_backend": "attention_backend",
    "num_threads": "num_threads", "enforce_eager": "enforce_eager", "seed": "seed",
    "async_scheduling": "async_scheduling",
    "tokenizer": "tokenizer", "quantization": "quantization",
    "served_model_name": "served_model_name",
    "tensor_parallel_size": "tensor_parallel_size",
    "custom_all_reduce": "custom_all_reduce", "tp_reduce_dtype": "tp_reduce_dtype",
    "tp_invariant": "tp_invariant",
    # serve only (add_replica_arguments)
    "data_parallel_size": "data_parallel_size", "distributed_executor": "distributed_executor",
    "ray_address": "ray_address", "ray_gpus_per_replica": "ray_gpus_per_replica",
    "prefix_affinity_slack": "prefix_affinity_slack",
    "replica_health_check_interval": "replica_health_check_interval",
    "replica_health_check_timeout": "replica_health_check_timeout",
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and engine options, shared by every command that builds an engine."""
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face model directory or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    group = parser.add_argument_group("engine")
    group.add_argument("--device", help="platform to run on: cpu, cuda, rocm, tpu, ... "
                                        "(default: $KVPORT_DEVICE, else the best available)")
    group.add_argument("--dtype", default="auto",
                       help="auto, float32, bfloat16 or float16 (default: auto = the platform's choice)")
    group.add_argument("--quantization", choices=("none", "int8"), default=None,
                       help="int8: W8A8 dynamic quantization (int8 weights per channel, "
                            "activations per token) where the platform offers it; faster "
                            "matmuls, slightly different outputs (default: none)")
    group.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens "
                                                         "(default: the model's limit)")
    group.add_argument("--max-num-seqs", type=int, default=256,
                       help="most requests in one batch (default: 256)")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="tokens per engine step; longer prompts are chunked (default: 2048)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    group.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 2GiB (CPU default: "
                                                 "4 GiB or a quarter of free memory)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of accelerator memory kvport may use (default: 0.9)")
    group.add_argument("--num-blocks", type=int, help="exact number of KV blocks (overrides sizing)")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="do not reuse the KV cache of shared prompt prefixes")
    group.add_argument("--attention-backend", help="a registered attention backend by name")
    group.add_argument("--num-threads", type=int, help="CPU threads for the model")
    group.add_argument("--enforce-eager", action="store_true", default=None,
                       help="never capture graphs (CUDA/HIP graphs); run every step eagerly")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="launch each step before the previous step's output is processed, "
                            "overlapping host work with the device (default: the platform's "
                            "choice: on for CUDA, off for the CPU)")
    group.add_argument("--seed", type=int, default=0, help="global random seed (default: 0)")
    group.add_argument("--tokenizer", help="tokenizer directory, if not the model's")
    group.add_argument("--max-waiting-requests", type=int,
                       help="queue limit; requests beyond it get HTTP 503 (default: no limit)")
    group.add_argument("--served-model-name", help="model id clients use (default: the file name)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int,
                       help="devices that each hold a slice of every layer, one worker process "
                            "per device (docs/distributed.md) (default: 1)")
    group.add_argument("--custom-all-reduce", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="with tensor parallelism, sum decode-sized tensors through the "
                            "platform's own all-reduce where it has one (CUDA: symmetric memory "
                            "over NVLink) instead of the distributed backend (default: on)")
    group.add_argument("--tp-reduce-dtype", choices=("auto", "float32"),
                       help="with tensor parallelism, sum the row-parallel layers' partial "
                            "products in the model dtype (auto: fastest) or in float32, "
                            "rounded once as on one device: outputs closest to one device's, "
                            "twice the all-reduce bytes (default: auto)")
    group.add_argument("--tp-invariant", action="store_true", default=None,
                       help="bit-identical logits at tensor-parallel sizes 1, 2, 4 and 8: "
                            "shape-invariant matmul kernels and float32 partial sums added in "
                            "a fixed tree, where the platform offers them (CUDA); slower "
                            "(docs/distributed.md) (default: off)")


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine replicas behind one server (data parallelism through Ray): `serve` only."""
    group = parser.add_argument_group("replicas (docs/distributed.md)")
    group.add_argument("--data-parallel-size", "-dp", type=int,
                       help="independent engine replicas behind this server, each with its "
                            "own KV cache; needs --distributed-executor ray (default: 1)")
    group.add_argument("--distributed-executor", choices=("mp", "ray"),
                       help="what starts the engines: mp (local processes) or ray (Ray actors, "
                            "on this machine or a Ray cluster; needs `pip install "
                            "'kvport[ray]'`) (default: mp)")
    group.add_argument("--ray-address",
                       help="Ray cluster to run replicas on (as printed by `ray start "
                            "--head`, or 'auto'); default: start a private local Ray")
    group.add_argument("--ray-gpus-per-replica", type=float,
                       help="GPUs Ray reserves for (and shows to) each replica (default: 0)")
    group.add_argument("--prefix-affinity-slack", type=int,
                       help="a prompt goes to the replica that last served its prefix unless "
                            "that one has more than this many requests above the least loaded "
                            "(default: 4)")
    group.add_argument("--replica-health-check-interval", type=float,
                       help="seconds between health checks of each replica (default: 10)")
    group.add_argument("--replica-health-check-timeout", type=float,
                       help="a replica that takes longer to answer one is removed "
                            "(default: 30)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kwargs = {field: getattr(args, dest) for dest, field in ENGINE_OPTIONS.items()
              if getattr(args, dest, None) is not None}
    kwargs["enable_prefix_caching"] = args.enable_prefix_caching
    return EngineConfig.from_kwargs(model=args.model, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvport", description="kvport: LLM serving on pluggable hardware.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API "
                    "(/v1/chat/completions, /v1/completions, /v1/models, ...).")
    add_engine_arguments(serve)
    add_replica_arguments(serve)
    http = serve.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    http.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    http.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests get to finish on SIGTERM (default: 30)")
    http.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    serve.set_defaults(func=run_serve)
    from kvport.api.plugin_commands import register_plugin_commands
    register_plugin_commands(commands)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args: print(_version()))
    try:
        from kvport.bench import register_bench_commands
    except ImportError:
        pass
    else:
        register_bench_commands(commands)
    return parser


def _version() -> str:
    import kvport
    return kvport.__version__


def run_serve(args: argparse.Namespace) -> int:
    from kvport.api.serve import serve
    return serve(engine_config_from_args(args), host=args.host, port=args.port,
                 api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
                 log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"kvport: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
