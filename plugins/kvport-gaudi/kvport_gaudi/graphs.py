"""HPU graphs: record a module's forward once per input shape, replay it afterwards.

Used only where they exist and apply: habana_frameworks.torch.hpu.graphs importable, the
bridge in lazy mode (HPU graphs record lazy-mode graphs; in eager mode they do not apply),
and --enforce-eager not set. Bucketed static shapes (kvport_gaudi/buckets.py) keep the
number of recordings bounded. Never run on Gaudi hardware.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

logger = logging.getLogger(__name__)


def hpu_graph_wrapper(enforce_eager: bool) -> tuple[Callable | None, str]:
    """(wrap_in_hpu_graph, "") when HPU graphs apply here, else (None, why not)."""
    if enforce_eager:
        return None, "--enforce-eager is set"
    try:
        graphs = importlib.import_module("habana_frameworks.torch.hpu.graphs")
    except ImportError as exc:
        return None, f"habana_frameworks.torch.hpu.graphs is not importable ({exc})"
    try:
        internal = importlib.import_module("habana_frameworks.torch.utils.internal")
        lazy = bool(internal.is_lazy())
    except (ImportError, AttributeError) as exc:
        return None, f"cannot tell the bridge's execution mode ({exc})"
    if not lazy:
        return None, "the bridge runs in eager mode (PT_HPU_LAZY_MODE=0); HPU graphs need lazy mode"
    return graphs.wrap_in_hpu_graph, ""


def maybe_wrap(module, enforce_eager: bool):
    """`module` wrapped in HPU graphs when they apply (logged either way)."""
    wrap, why_not = hpu_graph_wrapper(enforce_eager)
    if wrap is None:
        logger.info("HPU graphs off: %s", why_not)
        return module
    logger.info("HPU graphs on: one recording per bucketed step shape")
    # disable_tensor_cache: the KV cache and weights are already device tensors; the graph
    # need not keep its own copies of inputs between replays.
    return wrap(module, disable_tensor_cache=True)
