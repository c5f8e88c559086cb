"""`kvport plugins`: distribution and version, API range, devices, available here or why
not, attention backends; loaded, refused and failed plugins; `--json`."""
from __future__ import annotations

import json
import subprocess
import sys

from kvport.api.plugins_table import collect_plugins, render_table
from plugin_fakes import REPO_ROOT, FakeDists, _isolated, fakes, platform_hook  # noqa: F401

BACKEND_HOOK = '''
@hookimpl
def kvport_register_attention_backends(register):
    register(name="{name}", backend_class="m:C", device_types=({devices}))
'''


def by_plugin(data: dict) -> dict[str, dict]:
    return {p["plugin"]: p for p in data["plugins"]}


def test_collects_every_kind_of_plugin(fakes: FakeDists):
    fakes.add("gpu", platform_hook("gpu", "gpux", available=False,
                                   reason="no driver: install gpux-driver")
              + BACKEND_HOOK.format(name="gpu_flash", devices='"gpux",'), version="2.3")
    fakes.add("cpux", platform_hook("cpux", "cpux", available=True))
    fakes.add("extra", BACKEND_HOOK.format(name="extra_attn", devices='"cpux",'))
    fakes.add("future", platform_hook("future", "fut"),
              header='from kvport.platforms.hookspecs import hookimpl\n'
                     'KVPORT_PLUGIN_API = ">=3.0"\n')
    fakes.add("broken", "raise RuntimeError('missing libgpux.so')\n")
    data = collect_plugins(fakes.registry())
    assert data["plugin_api_version"] == "1.0"
    plugins = by_plugin(data)
    gpu = plugins["gpu"]
    assert (gpu["distribution"], gpu["version"], gpu["status"]) == ("kvport-fake-gpu", "2.3",
                                                                     "loaded")
    assert gpu["api_range"] == ">=1.0,<2"
    assert gpu["platforms"] == [{"name": "gpu", "device": "gpux", "priority": 50,
                                 "framework": "torch", "available": False,
                                 "reason": "no driver: install gpux-driver"}]
    assert gpu["attention_backends"] == [{"name": "gpu_flash", "devices": ["gpux"],
                                          "framework": "torch"}]
    assert plugins["cpux"]["platforms"][0]["available"] is True
    assert plugins["extra"]["platforms"] == []
    assert plugins["extra"]["attention_backends"][0]["name"] == "extra_attn"
    assert plugins["future"]["status"] == "refused"
    assert plugins["future"]["api_range"] == ">=3.0"
    assert "provides plugin API 1.0" in plugins["future"]["error"]
    assert plugins["broken"]["status"] == "failed"
    assert "missing libgpux.so" in plugins["broken"]["error"]
    assert plugins["builtin"]["attention_backends"][0]["name"] == "torch_reference"
    assert "LlamaForCausalLM (torch)" in plugins["builtin"]["models"]

    table = render_table(data)
    lines = table.splitlines()
    assert lines[0].startswith("kvport ") and lines[0].endswith(", plugin API 1.0")
    assert lines[2].split() == ["PLUGIN", "DISTRIBUTION", "API", "RANGE", "DEVICE",
                                "AVAILABLE", "ATTENTION", "BACKENDS"]
    gpu_line = next(line for line in lines if line.startswith("gpu "))
    assert gpu_line.split() == ["gpu", "kvport-fake-gpu", "2.3", ">=1.0,<2", "gpux", "no",
                                "gpu_flash", "(gpux)"]
    assert lines[lines.index(gpu_line) + 1].strip() == "why not: no driver: install gpux-driver"
    future_line = next(line for line in lines if line.startswith("future "))
    assert future_line.split()[3:5] == [">=3.0", "-"] and "refused" in future_line
    assert "why: plugin 'future'" in table
    assert "missing libgpux.so" in table


def test_excluded_plugins_are_listed(fakes: FakeDists):
    fakes.add("left", platform_hook("left", "leftdev"))
    fakes.add("kept", platform_hook("kept", "keptdev"))
    plugins = by_plugin(collect_plugins(fakes.registry(allow_list=["kept"])))
    assert plugins["left"]["status"] == "excluded" and plugins["kept"]["status"] == "loaded"


def test_cli_json_lists_the_installed_plugins():
    result = subprocess.run([sys.executable, "-m", "kvport.api.cli", "plugins", "--json"],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    plugins = by_plugin(json.loads(result.stdout))
    cpu = plugins["cpu"]
    assert cpu["distribution"] == "kvport-cpu" and cpu["api_range"] == ">=1.0,<2"
    assert cpu["platforms"][0]["device"] == "cpu" and cpu["platforms"][0]["available"]
    assert [b["name"] for b in cpu["attention_backends"]] == ["cpu_paged"]
    text = subprocess.run([sys.executable, "-m", "kvport.api.cli", "plugins"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT).stdout
    assert any(line.split()[:5] == ["cpu", "kvport-cpu", "0.1.0", ">=1.0,<2", "cpu"]
               for line in text.splitlines())
