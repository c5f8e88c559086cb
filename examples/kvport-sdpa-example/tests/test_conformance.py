"""kvport's conformance kit against the CPU platform, which includes this plugin's
cpu_sdpa backend once the plugin is installed: `pytest` here runs it (`--kvport-backend
cpu_sdpa` checks only this backend)."""
KVPORT_DEVICE = "cpu"

from kvport.testing.suite import *  # noqa: E402,F401,F403
