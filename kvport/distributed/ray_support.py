"""Whether Ray can be used here, with the one clear message when it cannot (imports no Ray)."""
from __future__ import annotations

import importlib

from kvport.core.async_engine import EngineStartupError

# The Ray release kvport's replicas were written and tested against (also pinned by the
# `kvport[ray]` extra and scripts/install.sh --test).
RAY_VERSION = "2.60.0"


class RayUnavailableError(EngineStartupError):
    """`--distributed-executor ray` was asked for, but Ray cannot be imported."""


def import_ray():
    """The `ray` module, or RayUnavailableError saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RayUnavailableError(
            f"--distributed-executor ray needs Ray, which cannot be imported here ({exc}). "
            f"Install it with `pip install 'kvport[ray]'` or `pip install ray=={RAY_VERSION}` "
            "(on every machine of the Ray cluster), or serve one engine without "
            "--distributed-executor ray") from None
