"""kvport-mps with a faked Mac: there is no Apple GPU here, nor has there been.

Detection takes the OS, architecture and macOS version as arguments (faked here); the
platform runs against torch with torch.backends.mps and torch.mps's memory answers faked;
dtype and memory rules are pure functions checked with a Sonoma and a Ventura Mac. The
registry, the `kvport plugins` listing and `kvport serve --device mps` run for real.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("kvport_mps") is None:
    pytest.skip("kvport-mps is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402
from kvport_mps import capabilities, detect, memory  # noqa: E402

from kvport.core.config import ConfigError, EngineConfig  # noqa: E402
from kvport.platforms.registry import PlatformSelectionError, PluginRegistry  # noqa: E402
from plugin_fakes import REPO_ROOT  # noqa: E402

GiB = 2**30


def test_unavailable_here_says_why():
    available, reason = detect.mps_is_available()
    assert not available
    assert reason.startswith(f"Apple Silicon Macs only: this machine runs {sys.platform}")


@pytest.mark.parametrize("system, machine, macos, expected", [
    ("darwin", "arm64", "14.5", (True, "Apple Silicon GPU, macOS 14.5")),
    ("darwin", "arm64", "12.3", (True, "Apple Silicon GPU, macOS 12.3")),
    ("darwin", "arm64", "12.2.1", (False, "macOS 12.2.1 is too old: MPS needs macOS 12.3 or "
                                          "later")),
    ("darwin", "x86_64", "13.6", (False, "Apple Silicon Macs only: this Mac is x86_64; "
                                         "PyTorch's MPS builds are for arm64")),
])
def test_detection_rules(system, machine, macos, expected):
    assert detect.mps_is_available(system, machine, macos) == expected


def test_dtype_rules_follow_the_macos_version():
    sonoma, ventura = (14, 2), (13, 6)
    assert capabilities.supported_dtypes(sonoma) == ("float16", "bfloat16", "float32")
    assert capabilities.supported_dtypes(ventura) == ("float16", "float32")
    assert capabilities.default_dtype("bfloat16", sonoma) == "bfloat16"
    assert capabilities.default_dtype("bfloat16", ventura) == "float16"
    assert capabilities.default_dtype("float32", sonoma) == "float16"
    assert capabilities.why_unsupported("bfloat16", ventura) == (
        "bfloat16 on MPS needs macOS 14 or later (this Mac runs macOS 13.6)")
    assert capabilities.why_unsupported("bfloat16", sonoma) is None
    assert "float64" not in capabilities.supported_dtypes(sonoma)


def test_kv_budget_comes_from_unified_memory():
    # a 64 GiB Mac: Metal lets the GPU hold 48 GiB, the weights took 8
    assert memory.free_gpu_bytes(48 * GiB, 8 * GiB) == 40 * GiB
    assert memory.kv_cache_budget(48 * GiB, 8 * GiB, 64 * GiB, 0.5) == 20 * GiB
    # 0.9 of the 40 GiB left would be 36 GiB: half the RAM (32 GiB) is the cap
    assert memory.kv_cache_budget(48 * GiB, 8 * GiB, 64 * GiB, 0.9) == 32 * GiB
    assert memory.free_gpu_bytes(4 * GiB, 5 * GiB) == 0


def test_unified_memory_is_read_from_sysctl(tmp_path, monkeypatch):
    """macOS's `sysctl -n hw.memsize` (a stand-in on PATH here), else the page count."""
    fallback = memory.unified_memory_bytes()
    assert fallback == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    sysctl = tmp_path / "sysctl"
    sysctl.write_text("#!/bin/sh\n[ \"$1 $2\" = \"-n hw.memsize\" ] && echo 68719476736\n")
    sysctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert memory.unified_memory_bytes() == 64 * GiB


@pytest.fixture
def fake_mac(monkeypatch):
    """Detection and torch's MPS answers of an arm64 Mac with 32 GiB on `macos`."""
    def install(macos="14.5"):
        monkeypatch.setattr(detect.mps_is_available, "__defaults__", ("darwin", "arm64", macos))
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 24 * GiB)
        monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 2 * GiB)
        monkeypatch.setattr(memory, "unified_memory_bytes", lambda: 32 * GiB)
        import platform
        monkeypatch.setattr(platform, "mac_ver", lambda: (macos, ("", "", ""), "arm64"))
        monkeypatch.delenv("KVPORT_DEVICE", raising=False)
        return PluginRegistry(allow_list=["mps"])
    return install


def test_registry_selects_mps_on_a_mac(fake_mac):
    registry = fake_mac("14.5")
    assert registry.select_registration(None).name == "mps"
    platform = registry.select_platform("mps")
    assert platform.total_memory_bytes() == 24 * GiB
    assert platform.free_memory_bytes() == 22 * GiB
    assert platform.kv_cache_budget_bytes(0.5) == 11 * GiB
    assert platform.supported_dtypes() == ("float16", "bfloat16", "float32")
    assert platform.default_dtype("bfloat16") == "bfloat16"
    assert platform.worker_class() == "kvport_mps.worker:MpsWorker"
    assert platform.default_attention_backend(EngineConfig()) == "mps_sdpa"
    assert platform.distributed_backend() == "gloo"


def test_bf16_is_refused_before_sonoma(fake_mac):
    platform = fake_mac("13.6").select_platform("mps")
    assert platform.default_dtype("bfloat16") == "float16"
    with pytest.raises(ConfigError, match=r"bfloat16 on MPS needs macOS 14 or later \(this Mac "
                                          r"runs macOS 13.6\)"):
        platform.check_and_update_config(EngineConfig.from_kwargs(dtype="bfloat16"))
    platform.check_and_update_config(EngineConfig.from_kwargs(dtype="float16"))


def test_worker_sizes_its_cache_from_the_platform(fake_mac):
    from kvport_mps.worker import MpsWorker

    platform = fake_mac("14.5").select_platform("mps")
    config = EngineConfig.from_kwargs(device="mps", dtype="float16",
                                      gpu_memory_utilization=0.5)
    assert MpsWorker(config, None, platform, None).kv_cache_budget_bytes() == 11 * GiB
    config = EngineConfig.from_kwargs(device="mps", dtype="float16", kv_cache_memory="3GiB")
    assert MpsWorker(config, None, platform, None).kv_cache_budget_bytes() == 3 * GiB
    assert MpsWorker(config, None, platform, None).torch_device() == torch.device("mps")


def test_a_mac_whose_torch_cannot_open_the_gpu_is_refused(fake_mac, monkeypatch):
    registry = fake_mac("14.5")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(PlatformSelectionError,
                       match=r"torch.backends.mps.is_available\(\) is False"):
        registry.select_platform("mps")


def test_device_mps_here_fails_naming_the_reason_and_the_alternatives():
    with pytest.raises(PlatformSelectionError) as info:
        PluginRegistry().select_platform("mps")
    message = str(info.value)
    assert "device 'mps' is provided by kvport-mps but is not available here" in message
    assert "Apple Silicon Macs only" in message and "Available here instead: cpu" in message


def test_kvport_serve_device_mps_fails_fast():
    result = subprocess.run([sys.executable, "-m", "kvport.api.cli", "serve", "--device", "mps",
                             "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "device 'mps' is provided by kvport-mps but is not available here" in result.stderr


def test_kvport_plugins_lists_mps_as_unavailable_with_its_reason():
    from kvport.api.plugins_table import collect_plugins, render_table

    data = collect_plugins(PluginRegistry())
    [entry] = [p for p in data["plugins"] if p["plugin"] == "mps"]
    [platform] = entry["platforms"]
    assert (platform["device"], platform["available"]) == ("mps", False)
    assert platform["reason"].startswith("Apple Silicon Macs only")
    assert [b["name"] for b in entry["attention_backends"]] == ["mps_sdpa"]
    assert "why not: Apple Silicon Macs only" in render_table(data)
