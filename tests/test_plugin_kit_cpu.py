"""The conformance kit against the CPU platform, in this process: kvport-cpu's platform and
worker, and every attention backend registered for the CPU: kvport-cpu's cpu_paged and, as
`scripts/install.sh --test` installs it, the example plugin's cpu_sdpa
(tests/test_plugin_example.py checks that it is installed). Fresh random inputs each run;
a failure names the seed to rerun with `pytest --kvport-seed N`."""
KVPORT_DEVICE = "cpu"

from kvport.testing.suite import *  # noqa: E402,F401,F403
