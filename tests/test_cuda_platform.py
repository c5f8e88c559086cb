"""kvport-cuda without a GPU: detection, selection and the platform's answers.

Detection reads torch/version.py as text and asks NVML; here both are replaced by fakes
written to disk (a torch/version.py of a CUDA, CPU or ROCm build) or by a GPU count, and the
real registry selects among the installed plugins. The platform class runs against torch with
its CUDA queries faked, which is all it asks of torch.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

if importlib.util.find_spec("kvport_cuda") is None:
    pytest.skip("kvport-cuda is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402

from kvport.platforms.registry import PlatformSelectionError, PluginRegistry  # noqa: E402
from kvport_cuda import detect  # noqa: E402

VERSION_FILE = '''from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '{version}'
debug = False
cuda: Optional[str] = {cuda!r}
git_version = '0123abcd'
hip: Optional[str] = {hip!r}
rocm: Optional[str] = None
'''


def fake_torch(tmp_path, version: str, cuda: str | None, hip: str | None) -> detect.TorchBuild:
    path = tmp_path / f"version-{version}.py"
    path.write_text(VERSION_FILE.format(version=version, cuda=cuda, hip=hip))
    return detect.read_torch_build(str(path))


@pytest.fixture
def cuda_torch(tmp_path, monkeypatch):
    build = fake_torch(tmp_path, "2.11.0+cu130", "13.0", None)
    monkeypatch.setattr(detect, "installed_torch_build", lambda: build)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("KVPORT_DEVICE", raising=False)
    monkeypatch.delenv("KVPORT_PLUGINS", raising=False)
    return build


def test_reads_the_build_of_each_kind_of_torch(tmp_path):
    assert fake_torch(tmp_path, "2.11.0+cu130", "13.0", None) == detect.TorchBuild(
        "2.11.0+cu130", "13.0", None)
    assert fake_torch(tmp_path, "2.13.0+cpu", None, None).cuda is None
    assert fake_torch(tmp_path, "2.9.0+rocm6.4", None, "6.4.43482").hip == "6.4.43482"


def test_the_installed_torch_is_read_without_importing_it():
    code = ("import sys; from kvport_cuda import detect; b = detect.installed_torch_build(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "import torch; assert b.version == torch.__version__, (b, torch.__version__); "
            "assert b.cuda == torch.version.cuda and b.hip == torch.version.hip; "
            "import kvport_cuda.plugin; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_available_with_a_cuda_torch_and_a_gpu(cuda_torch, monkeypatch):
    monkeypatch.setattr(detect, "nvidia_gpu_count", lambda: (2, ""))
    available, reason = detect.cuda_is_available()
    assert available and "2 NVIDIA GPU(s)" in reason and "CUDA 13.0" in reason


@pytest.mark.parametrize("build,expected", [
    (("2.13.0+cpu", None, None), "has no CUDA support: install a CUDA build"),
    (("2.9.0+rocm6.4", None, "6.4.1"), "is a ROCm build: use --device rocm"),
])
def test_unavailable_with_a_torch_of_another_kind(tmp_path, monkeypatch, build, expected):
    fake = fake_torch(tmp_path, *build)
    monkeypatch.setattr(detect, "installed_torch_build", lambda: fake)
    available, reason = detect.cuda_is_available()
    assert not available and expected in reason


def test_unavailable_without_a_driver_or_with_every_gpu_hidden(cuda_torch, monkeypatch):
    monkeypatch.setattr(detect, "NVML_LIBRARIES", ("libkvport-no-such-nvml.so",))
    available, reason = detect.cuda_is_available()
    assert not available and "no NVIDIA driver found" in reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect.cuda_is_available() == (False, "CUDA_VISIBLE_DEVICES='' hides every GPU")


def test_detection_reports_instead_of_raising(monkeypatch):
    def broken():
        raise PermissionError("torch/version.py: permission denied")
    monkeypatch.setattr(detect, "installed_torch_build", broken)
    assert detect.cuda_is_available() == (
        False, "CUDA detection failed: PermissionError: torch/version.py: permission denied")


def test_registry_selects_cuda_when_available_and_explains_when_not(cuda_torch, monkeypatch):
    registry = PluginRegistry(allow_list=["cuda"])
    monkeypatch.setattr(detect, "nvidia_gpu_count", lambda: (0, "the NVIDIA driver reports no GPU"))
    with pytest.raises(PlatformSelectionError, match="the NVIDIA driver reports no GPU"):
        registry.select_registration("cuda")
    with pytest.raises(PlatformSelectionError, match="the NVIDIA driver reports no GPU"):
        registry.select_registration(None)
    assert registry.attention_backend_class("triton_paged", "cuda").name == "triton_paged"

    available = PluginRegistry(allow_list=["cuda"])
    monkeypatch.setattr(detect, "nvidia_gpu_count", lambda: (1, ""))
    reg = available.select_registration(None)
    assert (reg.name, reg.priority, reg.framework) == ("cuda", 10, "torch")


def test_cuda_comes_before_cpu(cuda_torch, monkeypatch):
    if importlib.util.find_spec("kvport_cpu") is None:
        pytest.skip("kvport-cpu is not installed")
    monkeypatch.setattr(detect, "nvidia_gpu_count", lambda: (1, ""))
    assert PluginRegistry(allow_list=["cpu", "cuda"]).select_registration(None).name == "cuda"
    monkeypatch.setattr(detect, "nvidia_gpu_count", lambda: (0, "no GPU"))
    assert PluginRegistry(allow_list=["cpu", "cuda"]).select_registration(None).name == "cpu"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch's CUDA queries answering like one GPU of the given capability and memory."""
    def install(capability=(9, 0), free=70 << 30, total=80 << 30):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    return install


def test_platform_answers(fake_gpu):
    from kvport.core.config import EngineConfig
    from kvport_cuda.platform import CudaPlatform

    fake_gpu(capability=(9, 0), free=70 << 30, total=80 << 30)
    platform = CudaPlatform()
    assert (platform.total_memory_bytes(), platform.free_memory_bytes()) == (80 << 30, 70 << 30)
    assert platform.supported_dtypes()[0] == "bfloat16"
    assert platform.default_dtype("float32") == "bfloat16"
    assert platform.default_dtype("float16") == "float16"
    assert platform.distributed_backend() == "nccl"
    assert platform.default_attention_backend(EngineConfig()) == "triton_paged"
    assert platform.worker_class() == "kvport_cuda.worker:CudaWorker"


def test_fp16_where_bf16_is_missing(fake_gpu):
    from kvport.core.config import ConfigError, EngineConfig
    from kvport_cuda.platform import CudaPlatform

    fake_gpu(capability=(7, 5))                       # a T4
    platform = CudaPlatform()
    assert platform.default_dtype("bfloat16") == "float16"
    assert "bfloat16" not in platform.supported_dtypes()
    with pytest.raises(ConfigError, match="bfloat16 is not supported on cuda"):
        platform.check_and_update_config(EngineConfig.from_kwargs(dtype="bfloat16"))


def test_platform_refuses_to_start_without_a_gpu():
    from kvport_cuda.platform import CudaPlatform

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="sees no GPU"):
        CudaPlatform()
