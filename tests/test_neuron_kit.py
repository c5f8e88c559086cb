"""The conformance kit on kvport-neuron's attention, on the CPU: `neuron_paged` (its torch
path: neuronxcc is not installed here) is lent to the cpu platform (kvport/testing/foreign.py)
and checked against the torch reference over the kit's grid (mixed prefill/decode batches,
GQA, sliding windows, prefix-cached blocks) and end to end through the engine against
torch_reference's greedy tokens. The same as
`kvport plugins test cpu --foreign-backend neuron_paged`. Not run on Neuron hardware.
"""
import importlib.util

import pytest

if importlib.util.find_spec("kvport_neuron") is None:
    pytest.skip("kvport-neuron is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

KVPORT_DEVICE = "cpu"
KVPORT_FOREIGN_BACKENDS = ("neuron_paged",)

from kvport.testing.check_attention import *  # noqa: E402,F401,F403
from kvport.testing.check_worker import test_backend_greedy_tokens_equal_torch_reference  # noqa: E402,F401
from kvport.testing.fixtures import *  # noqa: E402,F401,F403
