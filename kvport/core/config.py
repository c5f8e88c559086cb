"""One validated dataclass tree for all of kvport's configuration.

Configuration flows one way: the user (CLI, `LLM(...)`) builds an `EngineConfig`, the selected
Platform adjusts it once in `check_and_update_config`, and everything downstream reads it.
Every check raises `ConfigError` naming the field, so bad input never reaches the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weight/activation quantization schemes a platform may offer (None: compute in `dtype`).
#   int8: W8A8 dynamic. Weights int8 per output channel, activations int8 per token, scaled at
#         run time; int32 accumulation. Faster matmuls, at a measured cost in fidelity.
QUANTIZATIONS = ("int8",)
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "half": "float16"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def parse_bytes(value: int | str | None, field_name: str) -> int | None:
    """Parse `4GiB`, `512MB`, `1e9` or a plain int into bytes (None passes through)."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise ConfigError(f"{field_name} must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"{field_name}: cannot parse {value!r} as a size (e.g. 4GiB, 512MB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "KI": 2**10,
             "M": 10**6, "MB": 10**6, "MIB": 2**20, "MI": 2**20,
             "G": 10**9, "GB": 10**9, "GIB": 2**30, "GI": 2**30,
             "T": 10**12, "TB": 10**12, "TIB": 2**40, "TI": 2**40}[unit]
    result = int(number * scale)
    if result <= 0:
        raise ConfigError(f"{field_name} must be positive, got {value!r}")
    return result


def normalize_dtype(dtype: str) -> str:
    """Map user spellings (bf16, half, ...) to one of DTYPES or raise ConfigError."""
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


@dataclass
class ModelConfig:
    """What to serve. `model=None` means the embedded SmolLM2-135M-Instruct."""
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    served_model_name: str | None = None
    seed: int = 0
    quantization: str | None = None

    def validate(self) -> None:
        self.dtype = normalize_dtype(self.dtype)
        if self.quantization in ("none", ""):
            self.quantization = None
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of none, {', '.join(QUANTIZATIONS)}, "
                              f"got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    """The paged KV cache. `num_blocks` overrides memory-based sizing (tests, debugging)."""
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory, "kv_cache_memory")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits per engine step."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int | None = None
    # Launch step N+1 before processing step N's output, so the host's scheduling and output
    # work overlaps the device (results then arrive one step late). None: the worker's
    # preference (on for CUDA, off for the CPU); True / False: forced.
    async_scheduling: bool | None = None

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1, "
                              f"got {self.max_num_batched_tokens}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ConfigError("max_waiting_requests must be >= 0, "
                              f"got {self.max_waiting_requests}")


@dataclass
class DeviceConfig:
    """Which platform plugin runs the model, and which attention backend it uses."""
    device: str | None = None
    attention_backend: str | None = None
    num_threads: int | None = None
    # Run every step eagerly: no graph capture (CUDA/HIP graphs) even where the platform has it.
    enforce_eager: bool = False

    def validate(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")


DISTRIBUTED_EXECUTORS = ("mp", "ray")
# tp_invariant's tree of partial sums has 8 leaves; these sizes give each rank a whole subtree.
TP_INVARIANT_SIZES = (1, 2, 4, 8)


@dataclass
class ParallelConfig:
    """How many devices and engines serve the model.

    tensor_parallel_size: devices that each hold a shard of every layer (one worker process per
    device, collectives through the Platform's distributed backend).
    data_parallel_size: independent engine replicas behind one front end.
    distributed_executor: what starts them, "mp" (local processes) or "ray" (Ray actors).
    Replicas (data_parallel_size > 1) need "ray": Ray gives each its own devices, on one
    machine or across a cluster (docs/distributed.md).
    ray_address: a running Ray cluster to join (what `ray start --head` prints, or "auto");
    None starts a private Ray instance on this machine.
    ray_gpus_per_replica: GPUs Ray reserves for each replica and makes visible to it.
    prefix_affinity_slack: how many more outstanding requests than the least loaded replica
    the replica that last served a prompt's prefix may have and still get it.
    replica_health_check_interval / _timeout: seconds between pings of each replica, and how
    long one may take before the replica is declared failed and removed.
    custom_all_reduce: under tensor parallelism, let the platform sum small tensors (decode
    steps) its own faster way where it has one (CUDA: PyTorch symmetric memory over NVLink);
    False sends every all-reduce through the distributed backend.
    tp_reduce_dtype: "auto" sums the row-parallel layers' partial products in the model dtype
    (each rank's part rounded, then the sum rounded: fastest); "float32" keeps the parts in
    float32 and rounds the sum once, as one device's matmul does, so tensor-parallel outputs
    match one device's far more closely (twice the all-reduce bytes).
    tp_invariant: compute every matmul with the platform's shape-invariant kernels and add
    the row-parallel layers' float32 partial sums in a fixed binary tree, so that
    tensor_parallel_size 1, 2, 4 and 8 give bit-identical logits (kvport/models/invariant.py).
    Slower; only where the platform offers the kernels (`Platform.supports_tp_invariant`).
    """
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor: str = "mp"
    ray_address: str | None = None
    ray_gpus_per_replica: float = 0.0
    prefix_affinity_slack: int = 4
    replica_health_check_interval: float = 10.0
    replica_health_check_timeout: float = 30.0
    custom_all_reduce: bool = True
    tp_reduce_dtype: str = "auto"
    tp_invariant: bool = False

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be >= 1, "
                              f"got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.tp_reduce_dtype not in ("auto", "float32"):
            raise ConfigError(f"tp_reduce_dtype must be auto or float32, "
                              f"got {self.tp_reduce_dtype!r}")
        if self.tp_invariant and self.tensor_parallel_size not in TP_INVARIANT_SIZES:
            raise ConfigError(f"tp_invariant needs tensor_parallel_size 1, 2, 4 or 8, got "
                              f"{self.tensor_parallel_size}: the partial sums are added in a "
                              "fixed binary tree of 8 groups, which those sizes cut evenly")
        if self.distributed_executor not in DISTRIBUTED_EXECUTORS:
            raise ConfigError("distributed_executor must be one of "
                              f"{', '.join(DISTRIBUTED_EXECUTORS)}, "
                              f"got {self.distributed_executor!r}")
        self._validate_replicas()

    def _validate_replicas(self) -> None:
        if self.data_parallel_size > 1 and self.distributed_executor != "ray":
            raise ConfigError("data_parallel_size > 1 needs distributed_executor 'ray' "
                              "(--distributed-executor ray): Ray starts the replicas and gives "
                              "each its own devices; without --ray-address it starts a local "
                              "Ray instance on this machine")
        if self.distributed_executor != "ray":
            for name in ("ray_address", "ray_gpus_per_replica"):
                if getattr(self, name):
                    raise ConfigError(f"{name} applies only with distributed_executor 'ray'")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("ray_address must not be empty (omit it to start a local Ray)")
        if self.ray_gpus_per_replica < 0:
            raise ConfigError("ray_gpus_per_replica must be >= 0, "
                              f"got {self.ray_gpus_per_replica}")
        if self.prefix_affinity_slack < 0:
            raise ConfigError("prefix_affinity_slack must be >= 0, "
                              f"got {self.prefix_affinity_slack}")
        for name in ("replica_health_check_interval", "replica_health_check_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


@dataclass
class EngineConfig:
    """The root of the tree. Call `validate()` after building; the Platform may then adjust it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "EngineConfig":
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.device.validate()
        self.parallel.validate()
        if self.parallel.tp_invariant and self.model.quantization is not None:
            raise ConfigError(f"tp_invariant and quantization {self.model.quantization} cannot "
                              "be combined: the invariant matmuls take the model dtype's weights")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (`LLM(...)`, CLI); unknown names raise ConfigError."""
        sections = {"model": ModelConfig, "cache": CacheConfig,
                    "scheduler": SchedulerConfig, "device": DeviceConfig,
                    "parallel": ParallelConfig}
        parts: dict[str, dict] = {name: {} for name in sections}
        for key, value in kwargs.items():
            owner = next((name for name, klass in sections.items()
                          if key in klass.__dataclass_fields__), None)
            if owner is None:
                raise ConfigError(f"unknown option {key!r}")
            parts[owner][key] = value
        return cls(**{name: klass(**parts[name]) for name, klass in sections.items()}).validate()
