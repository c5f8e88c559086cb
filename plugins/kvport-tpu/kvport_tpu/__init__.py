"""kvport-tpu: a JAX worker with ragged paged attention, for TPUs (`--device tpu`) and for
any backend JAX has (`--device xla`: CPU, CUDA)."""
__version__ = "0.1.0"
