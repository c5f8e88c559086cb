"""The worker end to end, through the real engine, on the kit's tiny random-weight Llama.

Framework-free: generated tokens are judged against the numpy reference model
(reference_checks), so a JAX worker is checked exactly like a torch one. Only the comparison
with the torch_reference backend needs a torch platform.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvport.core.sampling_params import SamplingParams
from kvport.testing.reference_checks import (LOGIT_TOLERANCE, bound_violations,
                                             greedy_violations, step_logits)

__all__ = ["test_greedy_tokens_match_the_reference_model",
           "test_backend_greedy_tokens_equal_torch_reference",
           "test_seeded_sampling_is_reproducible", "test_top_k_and_top_p_bounds_are_respected",
           "test_abort_and_preemption_leak_no_kv_blocks"]


def make_llm(target, model, dtype: str, **kwargs):
    """An offline engine for the target platform on the kit's model (small fixed cache)."""
    from kvport import LLM
    kwargs.setdefault("num_blocks", 160)
    kwargs.setdefault("max_model_len", 512)
    return LLM(model.path, device=target.name, dtype=dtype, registry=target.registry, **kwargs)


def random_prompts(seed: int, lengths, vocab: int, shared_prefix: int = 0) -> list[list[int]]:
    """Fresh random token ids (never the special 0-2); the last two prompts share a prefix."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, vocab, n)] for n in lengths]
    if shared_prefix:
        prefix = [int(t) for t in rng.integers(3, vocab, shared_prefix)]
        prompts += [prefix + [int(t) for t in rng.integers(3, vocab, 5)],
                    prefix + [int(t) for t in rng.integers(3, vocab, 9)]]
    return prompts


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def report(what: str, target, dtype: str, seed: int, failures: list[str]) -> str:
    return (f"{what} on platform {target.name!r} ({dtype}; kit seed {seed}, rerun with "
            f"--kvport-seed {seed}):\n  " + "\n  ".join(failures[:12])
            + (f"\n  ... and {len(failures) - 12} more" if len(failures) > 12 else ""))


def test_greedy_tokens_match_the_reference_model(kit_target, kit_model, kit_dtype, kit_seed):
    """Greedy decoding with the platform's default backend, batched, with chunked prefill
    (long prompts over several steps) and then again with the prefix cache warm."""
    prompts = random_prompts(kit_seed, (1, 4, 16, 17, 40, 100), kit_model.vocab_size,
                             shared_prefix=40)
    llm = make_llm(kit_target, kit_model, kit_dtype, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    failures = []
    for run in ("first run", "second run (prefix cache warm)"):
        for i, (prompt, generated) in enumerate(zip(prompts, tokens(
                llm.generate(prompts, params, use_tqdm=False)))):
            assert len(generated) == 12, f"request {i} generated {len(generated)} tokens, not 12"
            failures += [f"{run}, request {i} (prompt of {len(prompt)} tokens): {problem}"
                         for problem in greedy_violations(kit_model, prompt, generated,
                                                          kit_dtype)]
    assert not failures, report("greedy tokens differ from the reference model's", kit_target,
                                kit_dtype, kit_seed, failures)


def test_backend_greedy_tokens_equal_torch_reference(kit_torch_target, kit_backend, kit_model,
                                                     kit_dtype, kit_seed):
    """Each backend, selected by name as --attention-backend does, generates the tokens the
    torch_reference backend generates on the same device (near-ties excepted)."""
    if kit_backend == "torch_reference":
        pytest.skip("torch_reference is the reference")
    prompts = random_prompts(kit_seed + 1, (3, 16, 33, 70), kit_model.vocab_size,
                             shared_prefix=32)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for name in (kit_backend, "torch_reference"):
        llm = make_llm(kit_torch_target, kit_model, kit_dtype, attention_backend=name)
        outputs[name] = tokens(llm.generate(prompts, params, use_tqdm=False))
    failures = []
    for i, prompt in enumerate(prompts):
        ours, ref = outputs[kit_backend][i], outputs["torch_reference"][i]
        j = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if j is None:
            continue
        row = step_logits(kit_model, prompt, ours[:j + 1])[j]
        gap = abs(row[ref[j]] - row[ours[j]])
        if gap > LOGIT_TOLERANCE[kit_dtype]:
            failures.append(f"request {i} (prompt of {len(prompt)} tokens): generated token {j} "
                            f"is {ours[j]} with {kit_backend}, {ref[j]} with torch_reference; "
                            f"the reference model's logits differ by {gap:.4f}, not a near-tie")
    assert not failures, report(f"attention backend {kit_backend!r} changes greedy tokens",
                                kit_torch_target, kit_dtype, kit_seed, failures)


def test_seeded_sampling_is_reproducible(kit_target, kit_model, kit_dtype, kit_seed):
    """A request with a seed gets the same tokens whatever else is in the batch and whether
    its prefix was cached; another seed gets other tokens."""
    prompts = random_prompts(kit_seed + 2, (5, 12, 30, 31), kit_model.vocab_size)
    llm = make_llm(kit_target, kit_model, kit_dtype)

    def sample(seed_base: int, batch: list[int]) -> dict[int, list[int]]:
        params = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True,
                                 seed=seed_base + i) for i in batch]
        outs = llm.generate([prompts[i] for i in batch], params, use_tqdm=False)
        return dict(zip(batch, tokens(outs)))

    everything = list(range(len(prompts)))
    batched = sample(kit_seed, everything)
    again = sample(kit_seed, everything)                      # prefixes now cached
    alone = {}
    for i in reversed(everything):
        alone.update(sample(kit_seed, [i]))
    failures = [f"request {i}: batched {batched[i]}, batched again {again[i]}, alone {alone[i]}"
                for i in everything if not batched[i] == again[i] == alone[i]]
    assert not failures, report("seeded sampling is not reproducible", kit_target, kit_dtype,
                                kit_seed, failures)
    other = sample(kit_seed + 1000, everything)
    assert any(other[i] != batched[i] for i in everything), (
        "requests with different seeds generated identical tokens: the seed has no effect")


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (None, 0.5), (8, 0.7)],
                         ids=["top_k=3", "top_p=0.5", "top_k=8,top_p=0.7"])
def test_top_k_and_top_p_bounds_are_respected(kit_target, kit_model, kit_dtype, kit_seed,
                                              top_k, top_p):
    """At a high temperature every sampled token still lies within the top_k / top_p set of
    the reference distribution at its position."""
    prompts = random_prompts(kit_seed + 3, (2, 9, 20, 45, 64, 80), kit_model.vocab_size)
    llm = make_llm(kit_target, kit_model, kit_dtype)
    params = [SamplingParams(temperature=1.5, top_k=top_k, top_p=top_p, max_tokens=16,
                             ignore_eos=True, seed=kit_seed + i) for i in range(len(prompts))]
    failures = []
    for i, (prompt, generated) in enumerate(zip(prompts, tokens(
            llm.generate(prompts, params, use_tqdm=False)))):
        failures += [f"request {i}: {p}" for p in bound_violations(
            kit_model, prompt, generated, kit_dtype, 1.5, top_k, top_p)]
    assert not failures, report(f"sampling escaped top_k={top_k}, top_p={top_p}", kit_target,
                                kit_dtype, kit_seed, failures)


def test_abort_and_preemption_leak_no_kv_blocks(kit_target, kit_model, kit_dtype, kit_seed):
    """A cache too small for the batch forces preemption; some requests are aborted midway.
    Every block must be free at the end, and the finished requests' tokens still right."""
    from kvport.core.config import EngineConfig

    probe = EngineConfig.from_kwargs(device=kit_target.name, dtype=kit_dtype)
    kit_target.platform.check_and_update_config(probe)
    bs = probe.cache.block_size
    max_len = 8 * bs
    llm = make_llm(kit_target, kit_model, kit_dtype, num_blocks=9, max_model_len=max_len,
                   block_size=bs, max_num_seqs=8)
    engine = llm.engine
    lengths = [bs + 3, 2 * bs, 2 * bs + 7, 3 * bs, bs // 2 + 1, 2 * bs + 1, 3 * bs + 2, bs + 9]
    prompts = random_prompts(kit_seed + 4, lengths, kit_model.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=2 * bs, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    finished = {}
    for step in range(10_000):
        if step == 3:
            for request_id in (ids[1], ids[6]):
                assert engine.abort(request_id), f"abort({request_id}) found no request"
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    pool = engine.kv_cache.pool
    assert engine.scheduler.num_preemptions > 0, (
        f"the scenario did not preempt (block size {bs}, 9 blocks); the kit cannot check "
        "preemption on this platform's configuration")
    assert pool.num_free_blocks == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free_blocks} of {pool.num_blocks} KV blocks are still "
        "held after every request finished or was aborted (a leak)")
    assert not engine.scheduler.has_unfinished_requests()
    failures = []
    for i, request_id in enumerate(ids):
        if request_id in (ids[1], ids[6]):
            continue
        assert request_id in finished, f"request {i} never finished"
        failures += [f"request {i} (preempted batch): {p}" for p in greedy_violations(
            kit_model, prompts[i], finished[request_id], kit_dtype)]
    assert not failures, report("greedy tokens after preemption differ from the reference",
                                kit_target, kit_dtype, kit_seed, failures)
