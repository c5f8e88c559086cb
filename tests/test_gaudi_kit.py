"""The conformance kit on kvport-gaudi's attention, on the CPU: `hpu_flat` is lent to the cpu
platform (kvport/testing/foreign.py) and checked like one of its own backends, against the
torch reference over the kit's grid (mixed prefill/decode batches, GQA, sliding windows,
prefix-cached blocks) and end to end through the engine against torch_reference's greedy
tokens. The same as `kvport plugins test cpu --foreign-backend hpu_flat`. Not run on a Gaudi.
"""
import importlib.util

import pytest

if importlib.util.find_spec("kvport_gaudi") is None:
    pytest.skip("kvport-gaudi is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

KVPORT_DEVICE = "cpu"
KVPORT_FOREIGN_BACKENDS = ("hpu_flat",)

from kvport.testing.check_attention import *  # noqa: E402,F401,F403
from kvport.testing.check_worker import test_backend_greedy_tokens_equal_torch_reference  # noqa: E402,F401
from kvport.testing.fixtures import *  # noqa: E402,F401,F403


def test_kvport_plugins_test_lends_a_foreign_backend_to_the_cpu():
    import subprocess
    import sys

    from plugin_fakes import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "kvport.api.cli", "plugins", "test", "cpu", "--foreign-backend",
         "hpu_flat", "--pytest-args", "-k cache_layout"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "foreign backends hpu_flat" in result.stdout
    assert " 1 passed" in result.stdout


def test_an_unknown_foreign_backend_is_named():
    from kvport.platforms.registry import AttentionBackendError
    from kvport.testing.foreign import ForeignBackendRegistry

    with pytest.raises(AttentionBackendError, match="'?no_such_backend'? are not registered"):
        ForeignBackendRegistry(("no_such_backend",)).check_foreign()
