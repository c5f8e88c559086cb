"""kvport-cuda's model runner on the CPU, its Triton kernels in Triton's interpreter (on the
GPU where there is one).

The CUDA runner's own logic (block tables kept on the device across steps, one packed copy of
each step's integers, tiles and splits computed on the host, sampling) runs here on the CPU,
driven by the real scheduler and KV cache manager through chunked prefill, mixed steps,
decode and preemption; its greedy tokens must equal Hugging Face transformers' `generate`
in float32. CUDA graphs need a GPU: tests/gpu/ covers them.
"""
from __future__ import annotations

from triton_device import triton_device

DEVICE = triton_device("kvport_cuda")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvport.attention_backends.interface import AttentionSpec  # noqa: E402
from kvport.attention_backends.triton_paged import TritonPagedAttentionBackend  # noqa: E402
from kvport.core.config import SchedulerConfig  # noqa: E402
from kvport.core.kv_cache_manager import KVCacheManager  # noqa: E402
from kvport.core.model_info import resolve_model  # noqa: E402
from kvport.core.request import Request  # noqa: E402
from kvport.core.sampling_params import SamplingParams  # noqa: E402
from kvport.core.scheduler import Scheduler  # noqa: E402
from kvport.models.llama import LlamaForCausalLM  # noqa: E402
from kvport.models.loader import build_model  # noqa: E402
from kvport_cuda.block_tables import DeviceBlockTables  # noqa: E402
from kvport_cuda.host_batch import build_decode_batch, build_mixed_batch  # noqa: E402
from kvport_cuda.model_runner import CudaModelRunner  # noqa: E402

BLOCK_SIZE = 16


def run_greedy(runner, prompts, max_tokens, *, num_blocks, max_num_batched_tokens,
               max_num_seqs=8, max_model_len=256, async_scheduling=False):
    """Drive `runner` with the real scheduler until every prompt has its tokens. With
    `async_scheduling`, as the engine does: launch a step, then process the previous one."""
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens),
                          kv, max_model_len, async_scheduling=async_scheduling)
    requests = [Request(str(i), list(p), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                        ignore_eos=True))
                for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.add_request(r)
    steps = 0
    in_flight = None
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        if not async_scheduling:
            scheduler.update_from_output(runner.execute(out))
        else:
            launched = runner.execute_async(out)     # an empty step only drops freed ones
            if in_flight is not None:
                scheduler.update_from_output(in_flight.result())
            in_flight = None if out.is_empty else launched
        steps += 1
    runner.execute(scheduler.schedule())      # hand the last freed requests to the worker
    return [r.output_token_ids for r in requests], scheduler.num_preemptions, steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import build_tiny_model
    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama-cuda-runner")), "llama")
    info = resolve_model(path)
    spec = AttentionSpec(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                         head_size=info.head_size, block_size=BLOCK_SIZE, dtype="float32",
                         scale=info.head_size ** -0.5)
    backend = TritonPagedAttentionBackend(spec)
    model = build_model(info, LlamaForCausalLM, torch.float32, backend, DEVICE)
    return path, info, backend, model


def make_runner(info, backend, model, num_blocks):
    shape = backend.kv_cache_shape(num_blocks, BLOCK_SIZE, info.num_kv_heads, info.head_size)
    caches = [torch.randn(shape, device=DEVICE) for _ in range(info.num_layers)]  # not zeros
    return CudaModelRunner(model, backend, caches, DEVICE, BLOCK_SIZE,
                           info.vocab_size, max_num_seqs=8, max_model_len=256)


def hf_greedy(path, prompts, max_tokens):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outputs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(p):].tolist())
    return outputs


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_equals_transformers_through_chunked_prefill_and_preemption(tiny,
                                                                           async_scheduling):
    """Async: each step's inputs include the previous step's sampled ids, written on the
    device over placeholders (`pending`), in decode and in mixed steps."""
    path, info, backend, model = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, info.vocab_size, n).tolist() for n in (37, 5, 20, 1)]
    expected = hf_greedy(path, prompts, 6)
    # 24 tokens a step: prompts are chunked and decodes mix with prefill chunks; 5 blocks
    # for 4 requests that need 7 in all forces preemption by recompute.
    got, preemptions, _ = run_greedy(make_runner(info, backend, model, 5), prompts, 6,
                                     num_blocks=5, max_num_batched_tokens=24,
                                     async_scheduling=async_scheduling)
    assert got == expected
    assert preemptions > 0


def test_device_block_tables_send_only_new_ids_and_reuse_rows():
    tables = DeviceBlockTables(max_rows=2, max_blocks=4, device=DEVICE)
    tables.add("a", [7, 3])
    tables.add("b", [5])
    tables.flush()
    tables.extend("a", [7, 3, 9])
    tables.flush()
    assert tables.gather(["b", "a"]).tolist() == [[5, 0, 0, 0], [7, 3, 9, 0]]
    with pytest.raises(RuntimeError, match="no free row"):
        tables.add("c", [1])
    tables.remove("a")
    tables.add("c", [2, 4])
    tables.flush()
    assert tables.gather(["c"])[0, :2].tolist() == [2, 4]
    with pytest.raises(ValueError, match="max_model_len"):
        tables.extend("c", [1, 2, 3, 4, 5])


def test_host_batches_match_the_shared_input_builder():
    """Both builders against kvport.torch_worker.input_batch on the same states."""
    from kvport.torch_worker.input_batch import build_step_inputs
    from kvport.torch_worker.request_state import RequestState

    def state(prompt, output, blocks, computed):
        return RequestState(req_id=str(computed), prompt_token_ids=prompt,
                            output_token_ids=output, sampling_params=SamplingParams(),
                            block_ids=blocks, num_computed_tokens=computed)

    states = [state(list(range(100, 120)), [5, 6], [4, 9], 21),
              state(list(range(200, 203)), [], [2], 2),
              state(list(range(300, 340)), [1], [8, 1, 3], 40)]
    expected = build_step_inputs(states, [1, 1, 1], BLOCK_SIZE)
    got = build_decode_batch(states, BLOCK_SIZE)
    assert got.input_ids.tolist() == expected.input_ids.tolist()
    assert got.positions.tolist() == expected.positions.tolist()
    assert got.slot_mapping.tolist() == expected.attention.slot_mapping.tolist()
    assert got.seq_lens.tolist() == expected.attention.seq_lens.tolist()
    assert got.sampling_rows == [0, 1, 2]

    states[1].num_computed_tokens = 0
    expected = build_step_inputs(states, [1, 3, 1], BLOCK_SIZE)
    got = build_mixed_batch(states, [1, 3, 1], BLOCK_SIZE)
    assert not got.decode_only
    assert got.input_ids.tolist() == expected.input_ids.tolist()
    assert got.slot_mapping.tolist() == expected.attention.slot_mapping.tolist()
    assert got.logits_indices.tolist() == expected.logits_indices.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_rmsnorm(dtype):
    """The fused kernel against kvport's RMSNorm: the same roundings, so equal up to the
    float32 sum's order: within two units in the last place of the dtype on a GPU, four in
    Triton's CPU interpreter (it truncates float32 -> bf16 where the GPU rounds to nearest,
    and the three roundings compound)."""
    from kvport.models.layers import RMSNorm
    from kvport_cuda.fused_norm import FusedRMSNorm, fuse_rms_norms, rms_norm

    gen = torch.Generator().manual_seed(4)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen))
    x = (3 * torch.randn(5, 96, generator=gen)).to(dtype).to(DEVICE)
    residual = torch.randn(5, 96, generator=gen).to(dtype).to(DEVICE)
    norm = norm.to(DEVICE)
    ulp = 2.0 ** (-23 if dtype == torch.float32 else -7) * (2 if DEVICE.type == "cpu" else 1)
    out, new_residual = rms_norm(x, norm.weight, norm.eps, residual)
    expected, expected_residual = norm(x, residual)
    def close(a, b):
        return bool(((a.float() - b.float()).abs() <= 2 * ulp * b.float().abs()).all())

    assert close(new_residual, expected_residual)
    assert close(out, expected)
    assert close(rms_norm(x, norm.weight, norm.eps), norm(x))
    assert not close(rms_norm(x, norm.weight, norm.eps), norm(residual))   # the check can fail

    model = torch.nn.Sequential(norm, torch.nn.Linear(96, 4))
    assert fuse_rms_norms(model) == 1 and isinstance(model[0], FusedRMSNorm)
    assert model[0].weight is norm.weight
