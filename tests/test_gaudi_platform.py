"""kvport-gaudi with a faked Gaudi: there is no Gaudi here, nor has there been.

The fakes are written to disk: a `habana_frameworks` package (its `torch.hpu` module answers
is_available / mem_get_info / get_device_name, `torch.hpu.graphs.wrap_in_hpu_graph` records
what it wraps, `torch.utils.internal.is_lazy` says lazy mode) and the habanalabs driver's
device files. The real registry then selects among the installed plugins, and the Gaudi
worker serves a tiny model end to end with its device swapped for the CPU.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("kvport_gaudi") is None:
    pytest.skip("kvport-gaudi is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

from kvport_gaudi import detect  # noqa: E402

from kvport.platforms.registry import PlatformSelectionError, PluginRegistry  # noqa: E402
from plugin_fakes import REPO_ROOT, cpu_hosted_plugin, fakes  # noqa: E402,F401

FAKE_HABANA = {
    "habana_frameworks/__init__.py": "",
    "habana_frameworks/torch/__init__.py": "from habana_frameworks.torch import hpu  # noqa\n",
    "habana_frameworks/torch/hpu/__init__.py": textwrap.dedent('''
        AVAILABLE = True
        MEMORY = (90 << 30, 96 << 30)          # (free, total): a Gaudi 2


        def is_available():
            return AVAILABLE


        def mem_get_info(device=None):
            return MEMORY


        def get_device_name(device=None):
            return "GAUDI2"
    '''),
    "habana_frameworks/torch/hpu/graphs.py": textwrap.dedent('''
        import torch

        WRAPPED = []


        class Recorded(torch.nn.Module):
            """Calls the module; keeps the token count of every call (one graph each)."""

            def __init__(self, module):
                super().__init__()
                self.module = module
                self.token_counts = []

            def forward(self, input_ids, *args):
                self.token_counts.append(int(input_ids.shape[0]))
                return self.module(input_ids, *args)


        def wrap_in_hpu_graph(module, disable_tensor_cache=False):
            wrapped = Recorded(module)
            WRAPPED.append((wrapped, disable_tensor_cache))
            return wrapped
    '''),
    "habana_frameworks/torch/utils/__init__.py": "",
    "habana_frameworks/torch/utils/internal.py": "LAZY = True\n\n\ndef is_lazy():\n    return LAZY\n",
}


def write_tree(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def habana(tmp_path, monkeypatch):
    """habana_frameworks importable (from tmp_path/site) and two Gaudi device files."""
    write_tree(tmp_path / "site", FAKE_HABANA)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    accel = tmp_path / "dev" / "accel"
    accel.mkdir(parents=True)
    for name in ("accel0", "accel1", "accel_controlD0"):
        (accel / name).write_text("")
    patterns = ((str(accel), detect.DEVICE_PATTERNS[0][1]),
                (str(tmp_path / "dev"), detect.DEVICE_PATTERNS[1][1]))
    monkeypatch.setattr(detect.gaudi_is_available, "__defaults__", (patterns,))
    monkeypatch.delenv(detect.VISIBILITY_VARIABLE, raising=False)
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] == "habana_frameworks"]:
        del sys.modules[name]


def test_unavailable_here_says_why():
    available, reason = detect.gaudi_is_available()
    assert not available
    assert reason.startswith("habana_frameworks.torch is not importable")


def test_detects_the_stack_and_the_device_files(habana, monkeypatch):
    assert detect.gaudi_is_available() == (True, "2 Gaudi device(s)")
    monkeypatch.setenv("HABANA_VISIBLE_MODULES", "0,1")
    assert detect.gaudi_is_available() == (True, "2 Gaudi device(s) (HABANA_VISIBLE_MODULES=0,1)")
    monkeypatch.setenv("HABANA_VISIBLE_MODULES", "")
    assert detect.gaudi_is_available() == (False, "HABANA_VISIBLE_MODULES='' hides every Gaudi")
    monkeypatch.delenv("HABANA_VISIBLE_MODULES")
    assert "habana_frameworks" not in sys.modules          # found, never imported
    for path in detect.gaudi_device_files(detect.gaudi_is_available.__defaults__[0]):
        (habana / "dev" / "accel" / path.rsplit("/", 1)[1]).unlink()
    available, reason = detect.gaudi_is_available()
    assert not available and "no Gaudi device" in reason and "habanalabs" in reason


def test_registry_selects_hpu_on_a_gaudi_machine(habana):
    registry = PluginRegistry(allow_list=["gaudi"])
    assert registry.select_registration(None).name == "hpu"        # cpu is not in the list
    platform = registry.select_platform("hpu")
    assert (platform.total_memory_bytes(), platform.free_memory_bytes()) == (96 << 30, 90 << 30)
    assert platform.device_name() == "GAUDI2"
    assert platform.distributed_backend() == "hccl"
    assert platform.supported_dtypes() == ("bfloat16", "float32")
    assert platform.default_dtype("float16") == "bfloat16"
    assert platform.worker_class() == "kvport_gaudi.worker:GaudiWorker"
    from kvport.core.config import ConfigError, EngineConfig
    assert platform.default_attention_backend(EngineConfig()) == "hpu_flat"
    with pytest.raises(ConfigError, match="dtype float16 is not supported on hpu"):
        platform.check_and_update_config(EngineConfig.from_kwargs(dtype="float16"))


def test_platform_refuses_when_the_bridge_sees_no_gaudi(habana):
    import habana_frameworks.torch.hpu as hpu
    hpu.AVAILABLE = False
    registry = PluginRegistry(allow_list=["gaudi"])
    with pytest.raises(PlatformSelectionError, match=r"hpu.is_available\(\) is False"):
        registry.select_platform("hpu")


def test_device_hpu_here_fails_naming_the_reason_and_the_alternatives():
    registry = PluginRegistry()
    with pytest.raises(PlatformSelectionError) as info:
        registry.select_platform("hpu")
    message = str(info.value)
    assert "device 'hpu' is provided by kvport-gaudi but is not available here" in message
    assert "habana_frameworks.torch is not importable" in message
    assert "Available here instead: cpu" in message


def test_kvport_serve_device_hpu_fails_fast(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvport.api.cli", "serve", "--device", "hpu",
                             "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "device 'hpu' is provided by kvport-gaudi but is not available here" in result.stderr
    assert "habana_frameworks.torch is not importable" in result.stderr
    assert "Traceback" not in result.stderr         # a user's mistake, not a bug


def test_kvport_plugins_lists_hpu_as_unavailable_with_its_reason():
    from kvport.api.plugins_table import collect_plugins, render_table

    data = collect_plugins(PluginRegistry())
    [entry] = [p for p in data["plugins"] if p["plugin"] == "gaudi"]
    assert entry["distribution"] == "kvport-gaudi" and entry["status"] == "loaded"
    [platform] = entry["platforms"]
    assert (platform["device"], platform["available"]) == ("hpu", False)
    assert platform["reason"].startswith("habana_frameworks.torch is not importable")
    assert entry["attention_backends"] == [{"name": "hpu_flat", "devices": ["hpu"],
                                            "framework": "torch"}]
    table = render_table(data)
    assert "why not: habana_frameworks.torch is not importable" in table


# ------------------------------------------------------------------ HPU graphs and padding

def test_graph_wrapping_follows_availability(habana):
    from kvport_gaudi.graphs import hpu_graph_wrapper

    assert hpu_graph_wrapper(enforce_eager=True) == (None, "--enforce-eager is set")
    wrap, why = hpu_graph_wrapper(enforce_eager=False)
    assert why == "" and wrap.__module__ == "habana_frameworks.torch.hpu.graphs"
    import habana_frameworks.torch.utils.internal as internal
    internal.LAZY = False
    wrap, why = hpu_graph_wrapper(enforce_eager=False)
    assert wrap is None and "eager mode" in why
    (habana / "site" / "habana_frameworks" / "torch" / "hpu" / "graphs.py").unlink()
    del sys.modules["habana_frameworks.torch.hpu.graphs"]
    importlib.invalidate_caches()
    wrap, why = hpu_graph_wrapper(enforce_eager=False)
    assert wrap is None and "graphs is not importable" in why


CPU_GAUDI_PLUGIN = cpu_hosted_plugin(
    "kvport_gaudi", "GaudiPlatform", "GaudiWorker", name="hpu", device="hpu", priority=40,
    backend="hpu_flat", backend_class="kvport_gaudi.attention:GaudiPagedBackend")

PROMPTS = [[(7 * i + j * j) % 290 + 3 for j in range(3 + 19 * i)] for i in range(5)]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["hpu-graphs", "eager"])
def test_gaudi_worker_pads_steps_and_serves_the_reference_tokens(habana, fakes, tiny_llama_dir,
                                                                 enforce_eager):
    """Padded tokens (their keys/values written to the extra block), bucketed attention and
    the model wrapped in (faked) HPU graphs give torch_reference's greedy tokens."""
    from kvport import LLM, SamplingParams
    from kvport_gaudi.attention import GaudiPagedBackend
    import habana_frameworks.torch.hpu.graphs as graphs

    fakes.add("gaudi_on_cpu", CPU_GAUDI_PLUGIN)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kwargs = dict(dtype="float32", num_blocks=64, max_model_len=256, max_num_batched_tokens=48)
    llm = LLM(tiny_llama_dir, device="hpu", registry=fakes.registry(), enforce_eager=enforce_eager,
              **kwargs)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    worker = llm.engine.worker
    assert isinstance(worker.attn_backend, GaudiPagedBackend)
    assert worker.attn_backend.pad_slot == 64 * 16            # the block past the engine's 64
    assert worker.runner.kv_caches[0].shape[1] == 65
    reference = LLM(tiny_llama_dir, device="cpu", attention_backend="torch_reference",
                    registry=PluginRegistry(allow_list=["cpu"]), **kwargs)
    expected = [list(o.outputs[0].token_ids)
                for o in reference.generate(PROMPTS, params, use_tqdm=False)]
    assert ours == expected
    if enforce_eager:
        assert graphs.WRAPPED == []
        return
    [(recorded, disable_tensor_cache)] = graphs.WRAPPED
    assert disable_tensor_cache and recorded.module is worker.model
    tokens = worker.attn_backend.buckets.tokens
    assert all(tokens(n) == n for n in recorded.token_counts)   # only bucket sizes ran
    assert set(recorded.token_counts) == {32, 64}     # 48-token chunks ran as 64, decodes as 32
