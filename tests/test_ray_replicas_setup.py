"""Replica options: validation, the message without Ray, and kvport serving without Ray."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvport.api.cli import main
from kvport.core.config import ConfigError, EngineConfig
from kvport.distributed.ray_support import RAY_VERSION
from server_fixtures import REPO_ROOT


@pytest.mark.parametrize("kwargs, message", [
    ({"data_parallel_size": 2}, "needs distributed_executor 'ray'"),
    ({"ray_address": "auto"}, "ray_address applies only with distributed_executor 'ray'"),
    ({"ray_gpus_per_replica": 1.0}, "ray_gpus_per_replica applies only"),
    ({"distributed_executor": "ray", "ray_address": " "}, "ray_address must not be empty"),
    ({"distributed_executor": "ray", "ray_gpus_per_replica": -1.0}, "must be >= 0"),
    ({"prefix_affinity_slack": -1}, "prefix_affinity_slack must be >= 0"),
    ({"replica_health_check_timeout": 0}, "replica_health_check_timeout must be > 0"),
])
def test_bad_replica_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_kwargs(**kwargs)


def test_replica_flags_reach_the_config():
    config = EngineConfig.from_kwargs(data_parallel_size=3, distributed_executor="ray",
                                      ray_address="10.0.0.1:6379", prefix_affinity_slack=2)
    assert (config.parallel.data_parallel_size, config.parallel.ray_address,
            config.parallel.prefix_affinity_slack) == (3, "10.0.0.1:6379", 2)


def test_serve_with_replicas_but_no_ray_executor_says_to_use_ray(capsys):
    assert main(["serve", "--data-parallel-size", "2"]) == 2
    assert "--distributed-executor ray" in capsys.readouterr().err


def run_without_ray(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import ray` fails, as on a machine without Ray."""
    shim = "import sys\nsys.modules['ray'] = None   # makes `import ray` raise ImportError\n"
    return subprocess.run([sys.executable, "-c", shim + textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_without_ray_the_ray_executor_fails_at_start_saying_what_to_install():
    result = run_without_ray("""
        from kvport.api.cli import main
        sys.exit(main(["serve", "--device", "cpu", "--data-parallel-size", "2",
                       "--distributed-executor", "ray"]))
    """)
    assert result.returncode == 1, result.stderr
    assert "needs Ray" in result.stderr
    assert "pip install 'kvport[ray]'" in result.stderr
    assert f"pip install ray=={RAY_VERSION}" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_ray_kvport_imports_and_builds_its_single_engine():
    result = run_without_ray("""
        import kvport.api.app, kvport.api.serve, kvport.distributed.data_parallel
        from kvport.core.config import EngineConfig
        from kvport.core.engine_client import build_engine_client
        engine = build_engine_client(EngineConfig.from_kwargs(device="cpu"))
        print(type(engine).__name__, sys.modules["ray"])
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AsyncLLMEngine", "None"]
