"""Fake kvport plugins for the plugin tests: real distributions written to disk (a package
plus NAME-VERSION.dist-info with entry_points.txt), found through importlib.metadata and
imported by pluggy. Nothing about the registry is mocked.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import kvport.platforms
from kvport.platforms import PluginRegistry

FAKE_PREFIX = "kvfake_"
REPO_ROOT = Path(kvport.platforms.__file__).resolve().parents[2]

# Every fake plugin module starts with this: a complete Platform subclass and a call log.
PLUGIN_HEADER = '''
from kvport.platforms.hookspecs import hookimpl
from kvport.platforms.interface import Platform

KVPORT_PLUGIN_API = ">=1.0,<2"

CALLS = []


class FakePlatform(Platform):
    def total_memory_bytes(self):
        return 1 << 30

    def free_memory_bytes(self):
        return 1 << 29

    def supported_dtypes(self):
        return ("float32",)

    def default_dtype(self, checkpoint_dtype):
        return "float32"

    def distributed_backend(self):
        return "gloo"

    def default_attention_backend(self, config):
        return "torch_reference"

    def worker_class(self):
        return "kvport.torch_worker.worker:TorchWorker"
'''


def cpu_hosted_plugin(module: str, platform_class: str, worker_class: str, *, name: str,
                      device: str, priority: int, backend: str, backend_class: str) -> str:
    """Body of a plugin that registers `module`'s real platform and attention backend under
    their own names, with the worker computing on the CPU: everything but the device is the
    plugin's own (for plugins whose hardware is not here)."""
    return f'''
import torch

from {module}.platform import {platform_class}
from {module}.worker import {worker_class}


class CpuHostedWorker({worker_class}):
    def torch_device(self):
        return torch.device("cpu")


class CpuHostedPlatform({platform_class}):
    def worker_class(self):
        return __name__ + ":CpuHostedWorker"


@hookimpl
def kvport_register_platforms(register):
    register(name="{name}", device_type="{device}", platform_class=__name__ + ":CpuHostedPlatform",
             is_available=lambda: (True, "faked"), priority={priority})


@hookimpl
def kvport_register_attention_backends(register):
    register(name="{backend}", backend_class="{backend_class}", device_types=("{device}",))
'''


def platform_hook(name: str, device: str, *, priority: int = 50, available: bool = True,
                  reason: str = "", check: str | None = None,
                  platform_class: str = '__name__ + ":FakePlatform"') -> str:
    """Source of a kvport_register_platforms hook registering one platform."""
    check = check or f"lambda: ({available!r}, {reason!r})"
    return f'''
@hookimpl
def kvport_register_platforms(register):
    CALLS.append("platforms")
    register(name={name!r}, device_type={device!r}, platform_class={platform_class},
             is_available={check}, priority={priority})
'''


class FakeDists:
    """Writes plugin distributions (package + NAME-VERSION.dist-info) under one directory."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.modules: dict[str, str] = {}     # entry-point name -> module name
        monkeypatch.syspath_prepend(str(root))

    def add(self, ep_name: str, body: str, *, version: str = "1.0",
            dist_name: str | None = None, header: str | None = None) -> str:
        """Create distribution `dist_name` (default kvport-fake-<ep_name>) whose entry point
        <ep_name> is a fresh module (unique name, so tests never share sys.modules entries).
        header replaces PLUGIN_HEADER (e.g. to declare another plugin API range)."""
        module = f"{FAKE_PREFIX}{ep_name}_{uuid.uuid4().hex[:8]}"
        package = self.root / module
        package.mkdir()
        header = PLUGIN_HEADER if header is None else header
        (package / "__init__.py").write_text(header + textwrap.dedent(body))
        dist_name = dist_name or f"kvport-fake-{ep_name}"
        info = self.root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[kvport]\n{ep_name} = {module}\n")
        importlib.invalidate_caches()
        self.modules[ep_name] = module
        return module

    def entry_points(self) -> list[importlib.metadata.EntryPoint]:
        """The kvport entry points of the distributions in this directory only (with .dist)."""
        return [ep for dist in importlib.metadata.distributions(path=[str(self.root)])
                for ep in dist.entry_points if ep.group == "kvport"]

    def registry(self, **kwargs) -> PluginRegistry:
        return PluginRegistry(entry_points=self.entry_points(), **kwargs)

    def module(self, ep_name: str):
        return sys.modules[self.modules[ep_name]]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv("KVPORT_PLUGINS", raising=False)
    monkeypatch.delenv("KVPORT_DEVICE", raising=False)
    yield
    for name in [m for m in sys.modules if m.startswith(FAKE_PREFIX)]:
        del sys.modules[name]


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> FakeDists:
    return FakeDists(tmp_path, monkeypatch)
