"""Load a model's tokenizer (and its chat template) through transformers, offline."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from kvport.core.config import ConfigError
from kvport.core.model_info import ModelInfo

logger = logging.getLogger(__name__)
CACHE_DIR_ENV = "KVPORT_CACHE_DIR"


def load_tokenizer(model_info: ModelInfo, tokenizer_path: str | None = None):
    """The tokenizer for `model_info` (or from `tokenizer_path`); never touches the network."""
    if tokenizer_path is not None:
        return _from_pretrained(tokenizer_path)
    directory, gguf_file = model_info.tokenizer_source
    if gguf_file is None:
        return _from_pretrained(directory)
    return _gguf_tokenizer(model_info.path)


def _from_pretrained(directory: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as exc:
        raise ConfigError(f"cannot load a tokenizer from {directory!r}"
                          f"{' (' + gguf_file + ')' if gguf_file else ''}: {exc}") from exc


def tokenizer_cache_dir() -> str:
    """Where converted tokenizers are kept: $KVPORT_CACHE_DIR, else ~/.cache/kvport."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kvport")
    return os.path.join(root, "tokenizers")


def _gguf_tokenizer(path: str):
    """Converting a GGUF vocabulary takes transformers ~15 s; do it once per file version."""
    import transformers

    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|"
                         f"{transformers.__version__}".encode()).hexdigest()[:24]
    cached = os.path.join(tokenizer_cache_dir(), key)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return _from_pretrained(cached)
    tokenizer = _from_pretrained(os.path.dirname(path), os.path.basename(path))
    try:
        os.makedirs(tokenizer_cache_dir(), exist_ok=True)
        staging = tempfile.mkdtemp(dir=tokenizer_cache_dir())
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)   # atomic: a concurrent loader sees all or nothing
    except OSError as exc:
        logger.warning("could not cache the converted tokenizer in %s: %s", cached, exc)
        shutil.rmtree(locals().get("staging", ""), ignore_errors=True)
    return tokenizer


def eos_token_ids(model_info: ModelInfo, tokenizer) -> tuple[int, ...]:
    """Every token id that ends generation: the tokenizer's EOS plus generation_config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    candidates = [model_info.hf_config.get("eos_token_id")]
    gen_config = os.path.join(model_info.path, "generation_config.json")
    if model_info.format == "hf" and os.path.isfile(gen_config):
        with open(gen_config) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))
