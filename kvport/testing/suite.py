"""The conformance kit as one test module: what `pytest --kvport-device NAME` and
`kvport plugins test NAME` collect, and what a plugin's own test module star-imports::

    KVPORT_DEVICE = "mydevice"
    from kvport.testing.suite import *  # noqa: F401,F403

Imports no torch: the torch-based checks import it inside their tests.
"""
from kvport.testing.check_attention import *  # noqa: F401,F403
from kvport.testing.check_platform import *  # noqa: F401,F403
from kvport.testing.check_worker import *  # noqa: F401,F403
from kvport.testing.fixtures import *  # noqa: F401,F403
