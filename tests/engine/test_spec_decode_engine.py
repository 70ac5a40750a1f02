"""Speculative decoding in the engine: n-gram drafts verified in the flat batch. Greedy outputs are those without
speculation (batching, preemption, prefix hits, an int8 KV cache; both trained tiny models and a random config),
stop strings and max_tokens hold on accepted tokens, rejected drafts' blocks go back, and the opt-outs work."""

from __future__ import annotations

import pytest
from conftest import REPO

from microscale import LLM, SamplingParams
from microscale.config import EngineArgs, SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
_TEXT = (REPO / "data" / "pycode-valid.txt").read_text()
# 64 held-out code prompts; the trained models continue them with the loops n-gram lookup feeds on.
PROMPTS = [_TEXT[i * 997 : i * 997 + 160] for i in range(64)]


def _greedy(llm: LLM, prompts, **params) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=params.pop("max_tokens", 32), ignore_eos=True, **params)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize(("model", "knobs"), [
    ("tiny-llama-pycode", {}), ("tiny-llama-pycode", {"kv_cache_quant": "int8"}), ("tiny-gptoss-pycode", {}),
], ids=["llama", "llama-int8-kv", "gpt-oss"])
def test_greedy_outputs_are_those_without_speculation(model, knobs, assert_idle) -> None:
    path = str(REPO / "models" / model)
    plain = LLM(path, dtype="float32", **knobs)
    spec = LLM(path, dtype="float32", speculative_config=NGRAM, **knobs)
    assert _greedy(spec, PROMPTS) == _greedy(plain, PROMPTS)
    stats = spec.engine.get_stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert_idle(spec)


def test_preemption_and_prefix_hits_under_speculation(tiny_model, assert_idle) -> None:
    """A random model in a KV cache too small for the batch: sequences are preempted (swapped) and resumed, and
    prompts sharing a 48-token prefix hit the prefix cache; outputs are those of each request run alone."""
    path = tiny_model("llama")
    shared = list(range(100, 148))
    prompts = [{"prompt_token_ids": shared + [200 + i] * (4 + i % 5) + [7, 8, 9] * 3} for i in range(16)]
    # 40 blocks of 8 tokens: 2 layers x (K, V) x 2 KV heads x 16 dims x 4 bytes per token.
    kv_gib = 40 * 8 * (2 * 2 * 2 * 16 * 4) / 2**30
    llm = LLM(path, dtype="float32", max_model_len=160, max_num_seqs=16, block_size=8, kv_cache_memory=kv_gib,
              speculative_config=NGRAM)
    alone = [_greedy(llm, [p], max_tokens=64)[0] for p in prompts]
    llm.reset_prefix_cache()
    together = _greedy(llm, prompts, max_tokens=64)
    stats = llm.engine.get_stats()
    assert together == alone
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert_idle(llm)


def test_stops_and_lengths_hold_on_accepted_tokens(assert_idle) -> None:
    path = str(REPO / "models" / "tiny-llama-pycode")
    plain, spec = LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative_config=NGRAM)
    prompts = PROMPTS[:16]
    text = plain.generate(prompts[0], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0].text
    for params in (SamplingParams(temperature=0, max_tokens=48, stop=text[20:24]),
                   SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[plain.get_tokenizer().encode(
                       text[10:14], add_special_tokens=False)[0]])):
        want = [(o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].token_ids)
                for o in plain.generate(prompts, params, use_tqdm=False)]
        got = [(o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].token_ids)
               for o in spec.generate(prompts, params, use_tqdm=False)]
        assert got == want
    assert spec.engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
    assert_idle(spec)


def test_opt_outs(assert_idle) -> None:
    path = str(REPO / "models" / "tiny-llama-pycode")
    off = LLM(path, dtype="float32", speculative_config=NGRAM)
    _greedy(off, PROMPTS[:4], speculative_decoding=False)
    crowded = LLM(path, dtype="float32", speculative_config={**NGRAM, "disable_by_batch_size": 2})
    _greedy(crowded, PROMPTS[:3], max_tokens=3)  # three running: more than 2, no drafts while they all run
    for llm in (off, crowded):
        assert llm.engine.get_stats()["spec_decode_num_draft_tokens"] == 0
        assert_idle(llm)


def test_speculative_config_forms() -> None:
    model = str(REPO / "models" / "tiny-llama-pycode")
    from_json = EngineArgs(model=model, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert from_json.speculative_config == SpeculativeConfig("ngram", 3, 5, 5)
    with pytest.raises(ValueError, match="not supported yet"):
        EngineArgs(model=model, speculative_config={"method": "draft", "num_speculative_tokens": 3, "model": model})
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineArgs(model=model, speculative_config="{method")


def test_a_sampled_speculating_request_reproduces_with_its_seed() -> None:
    path = str(REPO / "models" / "tiny-llama-pycode")
    llm = LLM(path, dtype="float32", speculative_config=NGRAM)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=48)
    first = llm.generate(PROMPTS[:8], params, use_tqdm=False)
    alone = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == first[3].outputs[0].token_ids
    assert llm.engine.get_stats()["spec_decode_num_draft_tokens"] > 0


def test_logprobs_of_accepted_tokens_are_those_without_speculation() -> None:
    path = str(REPO / "models" / "tiny-llama-pycode")
    plain, spec = LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative_config=NGRAM)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3)
    want, got = (llm.generate(PROMPTS[:8], params, use_tqdm=False) for llm in (plain, spec))
    for a, b in zip(want, got, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        assert b.token_ids == a.token_ids and len(b.logprobs) == len(a.logprobs) == 32
        for entry_a, entry_b in zip(a.logprobs, b.logprobs, strict=True):
            assert list(entry_b) == list(entry_a)  # the same tokens, in the same order (chosen, then top-3)
            for token, lp in entry_a.items():
                assert entry_b[token].rank == lp.rank
                assert abs(entry_b[token].logprob - lp.logprob) < 1e-4  # prefill vs decode path rounding
        assert abs(b.cumulative_logprob - a.cumulative_logprob) < 1e-3
    assert spec.engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
