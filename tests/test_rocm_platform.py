"""kvport-rocm with a faked HIP build of torch: there is no AMD GPU here, nor has there been.

The fakes are a torch/version.py of a ROCm build and a KFD topology tree like the amdgpu
driver's (one CPU node, GPU nodes with SIMD units), both written to disk; the real registry
then selects among the installed plugins. The platform class runs against torch with
torch.version.hip set and its device queries answering like an MI300X or an MI50.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("kvport_rocm") is None:
    pytest.skip("kvport-rocm is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402

from kvport.platforms.registry import PlatformSelectionError, PluginRegistry  # noqa: E402
from kvport_cuda import detect as cuda_detect  # noqa: E402
from kvport_rocm import detect  # noqa: E402

HIP_VERSION_FILE = '''from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.9.1+rocm6.4'
debug = False
cuda: Optional[str] = None
git_version = '0123abcd'
hip: Optional[str] = '6.4.43484-123eb5128'
rocm: Optional[str] = '6.4.2'
'''


def kfd_tree(root, gpu_nodes: int):
    """/sys/class/kfd/kfd/topology/nodes as amdgpu writes it: node 0 a CPU, then GPUs."""
    nodes = root / "nodes"
    for i in range(1 + gpu_nodes):
        (nodes / str(i)).mkdir(parents=True)
        simd = 0 if i == 0 else 304
        (nodes / str(i) / "properties").write_text(
            f"cpu_cores_count {16 if i == 0 else 0}\nsimd_count {simd}\ngfx_target_version "
            f"{0 if i == 0 else 90402}\n")
    return str(nodes)


@pytest.fixture
def hip_machine(tmp_path, monkeypatch):
    """A ROCm torch, /dev/kfd and two MI300X nodes; returns (kfd device, topology)."""
    (tmp_path / "version.py").write_text(HIP_VERSION_FILE)
    build = cuda_detect.read_torch_build(str(tmp_path / "version.py"))
    monkeypatch.setattr(cuda_detect, "installed_torch_build", lambda: build)
    (tmp_path / "kfd").write_text("")
    topology = kfd_tree(tmp_path / "topology", gpu_nodes=2)
    monkeypatch.setattr(detect, "KFD_DEVICE", str(tmp_path / "kfd"))
    monkeypatch.setattr(detect, "KFD_TOPOLOGY", topology)
    monkeypatch.setattr(detect.rocm_is_available, "__defaults__",
                        (str(tmp_path / "kfd"), topology))
    for name in detect.VISIBILITY_VARIABLES + ("KVPORT_DEVICE", "KVPORT_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return str(tmp_path / "kfd"), topology


def test_detects_a_hip_torch_and_counts_gpu_nodes(hip_machine):
    assert cuda_detect.installed_torch_build().hip == "6.4.43484-123eb5128"
    assert detect.amd_gpu_count(hip_machine[1]) == 2
    assert detect.rocm_is_available() == (
        True, "2 AMD GPU(s); torch 2.9.1+rocm6.4 (HIP 6.4.43484-123eb5128)")
    available, reason = cuda_detect.cuda_is_available()
    assert not available and "is a ROCm build: use --device rocm" in reason


def test_unavailable_reasons(hip_machine, tmp_path, monkeypatch):
    kfd, topology = hip_machine
    assert detect.rocm_is_available(kfd_device=str(tmp_path / "missing")) == (
        False, f"no AMD GPU driver: {tmp_path / 'missing'} does not exist (is amdgpu loaded?)")
    only_cpu = kfd_tree(tmp_path / "cpu-only", gpu_nodes=0)
    assert not detect.rocm_is_available(kfd, only_cpu)[0]
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "-1")
    assert detect.rocm_is_available() == (False, "HIP_VISIBLE_DEVICES='-1' hides every GPU")


def test_unavailable_with_a_cuda_torch(tmp_path, monkeypatch):
    (tmp_path / "version.py").write_text(HIP_VERSION_FILE.replace(
        "cuda: Optional[str] = None", "cuda: Optional[str] = '13.0'").replace(
        "hip: Optional[str] = '6.4.43484-123eb5128'", "hip: Optional[str] = None"))
    build = cuda_detect.read_torch_build(str(tmp_path / "version.py"))
    monkeypatch.setattr(cuda_detect, "installed_torch_build", lambda: build)
    available, reason = detect.rocm_is_available()
    assert not available and "is a CUDA 13.0 build, not a ROCm (HIP) build" in reason


def test_registry_selects_rocm_on_an_amd_machine(hip_machine):
    registry = PluginRegistry(allow_list=["cuda", "rocm"])
    assert registry.select_registration(None).name == "rocm"        # cuda (10) is unavailable
    assert registry.select_registration("rocm").platform_class == \
        "kvport_rocm.platform:RocmPlatform"
    with pytest.raises(PlatformSelectionError, match="ROCm build: use --device rocm"):
        registry.select_registration("cuda")
    backend = registry.attention_backend_class("triton_paged_rocm", "rocm")
    assert backend.launch.decode_stages == 1


@pytest.fixture
def fake_hip_gpu(monkeypatch):
    def install(arch="gfx942:sramecc+:xnack-"):
        props = type("Props", (), {"gcnArchName": arch, "multi_processor_count": 304})()
        monkeypatch.setattr(torch.version, "hip", "6.4.43484-123eb5128")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (180 << 30, 192 << 30))
    return install


def test_platform_on_an_mi300x(fake_hip_gpu):
    from kvport.core.config import EngineConfig
    from kvport_rocm.platform import RocmPlatform

    fake_hip_gpu("gfx942:sramecc+:xnack-")
    platform = RocmPlatform()
    assert platform.architecture() == "gfx942"
    assert platform.default_dtype("float32") == "bfloat16"
    assert platform.total_memory_bytes() == 192 << 30
    assert platform.default_attention_backend(EngineConfig()) == "triton_paged_rocm"
    assert platform.distributed_backend() == "nccl"          # RCCL, under torch's name
    assert platform.worker_class() == "kvport_cuda.worker:CudaWorker"


def test_fp16_on_an_mi50_and_no_start_on_a_cuda_torch(fake_hip_gpu, monkeypatch):
    from kvport_rocm.platform import RocmPlatform

    fake_hip_gpu("gfx906:sramecc+:xnack-")
    assert RocmPlatform().default_dtype("bfloat16") == "float16"
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(RuntimeError, match="not a ROCm"):
        RocmPlatform()


def test_rocm_launch_defaults_compute_the_same_attention():
    """The ROCm tiles (one pipeline stage, 32-key tiles) against the torch reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("TRITON_INTERPRET is set to something other than 1")
    from kvport_rocm.attention import RocmTritonPagedBackend
    from paged_cases import MAX_REL_ERR, compare_with_reference, random_step

    step = random_step([(0, 5), (40, 1), (70, 3)], num_heads=4, num_kv_heads=1, head_size=16,
                       block_size=16, seed=21, device=device)
    err, _ = compare_with_reference(RocmTritonPagedBackend(step.spec), step)
    assert err < MAX_REL_ERR["float32"], err
