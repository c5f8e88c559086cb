"""kvport-neuron with a faked Trainium: there is no Neuron device here, nor has there been.

The fakes are written to disk: /dev/neuron<N> device files and an (empty) torch_neuronx
package; torch.accelerator's answers are faked as TorchNeuron would give them. The real
registry then selects among the installed plugins, and the Neuron worker serves a tiny
model end to end with its device swapped for the CPU.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("kvport_neuron") is None:
    pytest.skip("kvport-neuron is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402
from kvport_neuron import detect  # noqa: E402

from kvport.core.config import EngineConfig  # noqa: E402
from kvport.platforms.registry import PlatformSelectionError, PluginRegistry  # noqa: E402
from plugin_fakes import REPO_ROOT, cpu_hosted_plugin, fakes  # noqa: E402,F401

GiB = 2**30


@pytest.fixture
def trainium(tmp_path, monkeypatch):
    """torch_neuronx importable, two /dev/neuron<N>, torch.accelerator answering `neuron`."""
    (tmp_path / "site" / "torch_neuronx").mkdir(parents=True)
    (tmp_path / "site" / "torch_neuronx" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    (tmp_path / "dev").mkdir()
    for name in ("neuron0", "neuron1", "null"):
        (tmp_path / "dev" / name).write_text("")
    monkeypatch.setattr(detect.neuron_is_available, "__defaults__", (str(tmp_path / "dev"),))
    monkeypatch.delenv(detect.VISIBILITY_VARIABLE, raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    # torch.device("neuron") exists only once TorchNeuron renames PrivateUse1 (for good, in a
    # process): the fake accelerator is an object with TorchNeuron's device type instead.
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: SimpleNamespace(type="neuron"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "get_memory_info",
                        lambda device=None: (80 * GiB, 96 * GiB))      # a Trainium2 chip
    yield tmp_path
    sys.modules.pop("torch_neuronx", None)


def test_unavailable_here_says_why():
    assert detect.neuron_is_available() == (False,
                                            "no /dev/neuron* and torch_neuronx not importable")


def test_detection_reasons(trainium, monkeypatch):
    assert detect.neuron_is_available() == (True, "2 Neuron device(s)")
    assert "torch_neuronx" not in sys.modules               # found, never imported
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "")
    assert detect.neuron_is_available() == (False, "NEURON_RT_VISIBLE_CORES='' hides every "
                                                   "NeuronCore")
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-3")
    assert detect.neuron_is_available() == (True, "2 Neuron device(s) "
                                                  "(NEURON_RT_VISIBLE_CORES=0-3)")
    available, reason = detect.neuron_is_available(str(trainium / "nowhere"))
    assert not available and "there is no /dev/neuron*" in reason


def test_devices_without_torch_neuronx(tmp_path):
    (tmp_path / "neuron0").write_text("")
    available, reason = detect.neuron_is_available(str(tmp_path))
    assert not available
    assert reason.startswith("1 Neuron device(s), but torch_neuronx is not importable")


def test_registry_selects_neuron_on_a_trainium_host(trainium):
    registry = PluginRegistry(allow_list=["neuron"])
    assert registry.select_registration(None).name == "neuron"
    platform = registry.select_platform("neuron")
    assert (platform.total_memory_bytes(), platform.free_memory_bytes()) == (96 * GiB, 80 * GiB)
    assert platform.default_dtype("float32") == "bfloat16"
    assert platform.default_dtype("float16") == "float16"
    assert platform.worker_class() == "kvport_neuron.worker:NeuronWorker"
    assert platform.default_attention_backend(EngineConfig()) == "neuron_paged"
    assert platform.distributed_backend() == "neuron"


def test_platform_refuses_when_torch_has_no_neuron_accelerator(trainium, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device("cpu"))
    with pytest.raises(PlatformSelectionError, match="torch's accelerator is cpu, not neuron"):
        PluginRegistry(allow_list=["neuron"]).select_platform("neuron")


def test_device_neuron_here_fails_naming_the_reason_and_the_alternatives():
    with pytest.raises(PlatformSelectionError) as info:
        PluginRegistry().select_platform("neuron")
    message = str(info.value)
    assert "device 'neuron' is provided by kvport-neuron but is not available here" in message
    assert "no /dev/neuron* and torch_neuronx not importable" in message
    assert "Available here instead: cpu" in message


def test_kvport_serve_device_neuron_fails_fast():
    result = subprocess.run([sys.executable, "-m", "kvport.api.cli", "serve", "--device",
                             "neuron", "--port", "0"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "no /dev/neuron* and torch_neuronx not importable" in result.stderr


def test_kvport_plugins_lists_neuron_as_unavailable_with_its_reason():
    from kvport.api.plugins_table import collect_plugins, render_table

    data = collect_plugins(PluginRegistry())
    [entry] = [p for p in data["plugins"] if p["plugin"] == "neuron"]
    [platform] = entry["platforms"]
    assert (platform["device"], platform["available"]) == ("neuron", False)
    assert platform["reason"] == "no /dev/neuron* and torch_neuronx not importable"
    assert [b["name"] for b in entry["attention_backends"]] == ["neuron_paged"]
    assert "why not: no /dev/neuron* and torch_neuronx not importable" in render_table(data)


CPU_NEURON_PLUGIN = cpu_hosted_plugin(
    "kvport_neuron", "NeuronPlatform", "NeuronWorker", name="neuron", device="neuron",
    priority=50, backend="neuron_paged",
    backend_class="kvport_neuron.attention:NeuronPagedBackend")


def test_neuron_worker_pads_steps_and_serves_the_reference_tokens(trainium, fakes,
                                                                  tiny_llama_dir):
    from kvport import LLM, SamplingParams

    fakes.add("neuron_on_cpu", CPU_NEURON_PLUGIN)
    prompts = [[(11 * i + j * j) % 290 + 3 for j in range(3 + 17 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kwargs = dict(dtype="float32", num_blocks=64, max_model_len=256, max_num_batched_tokens=40)
    llm = LLM(tiny_llama_dir, device="neuron", registry=fakes.registry(), **kwargs)
    shapes = []
    backend = llm.engine.worker.attn_backend
    build = backend.build_metadata

    def recording(common, device):
        metadata = build(common, device)
        shapes.append(metadata.shape_key())
        return metadata

    backend.build_metadata = recording
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert backend.pad_slot == 64 * 16 and llm.engine.worker.runner.kv_caches[0].shape[1] == 65
    reference = LLM(tiny_llama_dir, device="cpu", attention_backend="torch_reference",
                    registry=PluginRegistry(allow_list=["cpu"]), **kwargs)
    assert ours == [list(o.outputs[0].token_ids)
                    for o in reference.generate(prompts, params, use_tqdm=False)]
    tokens = {shape[0] for shape in shapes}
    assert tokens == {32, 64}                      # 40-token chunks ran as 64, decodes as 32
    assert all(size & (size - 1) == 0 for shape in shapes for size in shape if size)
