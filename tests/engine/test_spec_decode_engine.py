"""Speculative decoding in the engine: n-gram and draft-model drafts verified in the flat batch. Greedy outputs are
those without speculation (batching, preemption, prefix hits, an int8 KV cache, n > 1; both trained tiny models and
a random config), stop strings and max_tokens hold on accepted tokens, rejected drafts' blocks go back, sampled
tokens follow the target's distribution, and the opt-outs work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

from microscale import LLM, SamplingParams
from microscale.config import EngineArgs, SpeculativeConfig

# Speculation on however many requests run (on a CPU it is off by default above a few, where it stops paying).
ALWAYS = {"disable_by_batch_size": 4096}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4, **ALWAYS}
# The bundled model's trained draft (tools/train_draft_model.py); tiny-gptoss-pycode shares its tokenizer.
DRAFT = {"method": "draft", "model": str(REPO / "models" / "tiny-llama-pycode-draft"), "num_speculative_tokens": 4,
         **ALWAYS}
_TEXT = (REPO / "data" / "pycode-valid.txt").read_text()
# 64 held-out code prompts; the trained models continue them with the loops n-gram lookup feeds on.
PROMPTS = [_TEXT[i * 997 : i * 997 + 160] for i in range(64)]


def _greedy(llm: LLM, prompts, **params) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=params.pop("max_tokens", 32), ignore_eos=True, **params)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


_plain_outputs: dict[tuple, list[list[int]]] = {}


@pytest.mark.parametrize(("model", "knobs", "spec"), [
    ("tiny-llama-pycode", {}, NGRAM), ("tiny-llama-pycode", {"kv_cache_quant": "int8"}, NGRAM),
    ("tiny-gptoss-pycode", {}, NGRAM), ("tiny-llama-pycode", {}, DRAFT),
    ("tiny-llama-pycode", {"kv_cache_quant": "int8"}, DRAFT), ("tiny-gptoss-pycode", {}, DRAFT),
], ids=["llama", "llama-int8-kv", "gpt-oss", "llama-draft", "llama-int8-kv-draft", "gpt-oss-draft"])
def test_greedy_outputs_are_those_without_speculation(model, knobs, spec, assert_idle) -> None:
    path = str(REPO / "models" / model)
    key = (model, tuple(knobs.items()))
    if key not in _plain_outputs:
        _plain_outputs[key] = _greedy(LLM(path, dtype="float32", **knobs), PROMPTS)
    llm = LLM(path, dtype="float32", speculative_config=spec, **knobs)
    assert _greedy(llm, PROMPTS) == _plain_outputs[key]
    stats = llm.engine.get_stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert_idle(llm)
    _assert_draft_cache_released(llm)


def _assert_draft_cache_released(llm: LLM) -> None:
    """Every finished sequence gave its draft-model KV blocks back."""
    proposer = llm.engine.scheduler.proposer
    if hasattr(proposer, "free_blocks"):
        assert not proposer.states and len(proposer.free_blocks) == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_and_prefix_hits_under_speculation(method, tiny_model, assert_idle) -> None:
    """A random model in a KV cache too small for the batch: sequences are preempted (swapped) and resumed, and
    prompts sharing a 48-token prefix hit the prefix cache; outputs are those of each request run alone. The draft
    model is the target itself: every draft is accepted, so sequences run k tokens ahead each step."""
    path = tiny_model("llama")
    spec = NGRAM if method == "ngram" else {"method": "draft", "model": str(path), "num_speculative_tokens": 3,
                                            **ALWAYS}
    shared = list(range(100, 148))
    prompts = [{"prompt_token_ids": shared + [200 + i] * (4 + i % 5) + [7, 8, 9] * 3} for i in range(16)]
    # 40 blocks of 8 tokens: 2 layers x (K, V) x 2 KV heads x 16 dims x 4 bytes per token.
    kv_gib = 40 * 8 * (2 * 2 * 2 * 16 * 4) / 2**30
    if method == "draft":
        kv_gib *= 2  # the draft's cache takes as much again from the budget
    llm = LLM(path, dtype="float32", max_model_len=160, max_num_seqs=16, block_size=8, kv_cache_memory=kv_gib,
              speculative_config=spec)
    alone = [_greedy(llm, [p], max_tokens=64)[0] for p in prompts]
    llm.reset_prefix_cache()
    together = _greedy(llm, prompts, max_tokens=64)
    stats = llm.engine.get_stats()
    assert together == alone
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert_idle(llm)
    _assert_draft_cache_released(llm)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_parallel_samples_of_a_greedy_request(method, assert_idle) -> None:
    """n > 1: siblings fork off the parent's prompt and speculate on their own; each is the plain greedy output."""
    path = str(REPO / "models" / "tiny-llama-pycode")
    spec = NGRAM if method == "ngram" else DRAFT
    plain = _greedy(LLM(path, dtype="float32"), PROMPTS[:6])
    llm = LLM(path, dtype="float32", speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, n=3)
    for want, got in zip(plain, llm.generate(PROMPTS[:6], params, use_tqdm=False), strict=True):
        assert [o.token_ids for o in got.outputs] == [want] * 3
    assert llm.engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
    assert_idle(llm)
    _assert_draft_cache_released(llm)


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
    with pytest.raises(ValueError, match="not supported with tensor_parallel_size > 1"):
        EngineArgs(model=model, tensor_parallel_size=2,
                   speculative_config={"method": "draft", "num_speculative_tokens": 3, "model": model})
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


def test_a_draft_model_must_exist_and_share_the_vocabulary(tiny_model, tmp_path) -> None:
    target = str(REPO / "models" / "tiny-llama-pycode")
    other = tiny_model("llama", vocab_size=4100)
    with pytest.raises(ValueError, match="vocabulary of 4100 tokens, the target 4096"):
        LLM(target, dtype="float32", speculative_config={"method": "draft", "model": str(other),
                                                         "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"speculative_config.model \(the draft model\): Model path .* not a folder"):
        LLM(target, dtype="float32", speculative_config={"method": "draft", "model": str(tmp_path / "none"),
                                                         "num_speculative_tokens": 2})


def test_a_draft_model_samples_as_the_target_does(tiny_model) -> None:
    """The target as its own draft: with the draft's distributions processed exactly as the target's (temperature,
    top-k, top-p, min_p, penalties counting earlier drafts as output), p == q and every draft is accepted."""
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32", speculative_config={"method": "draft", "model": path,
                                                          "num_speculative_tokens": 3, **ALWAYS})
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
                            frequency_penalty=0.2, seed=7, max_tokens=24, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5 + i, 9, 13 + i]} for i in range(8)], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["spec_decode_num_draft_tokens"] > 100
    assert stats["spec_decode_num_accepted_tokens"] >= 0.99 * stats["spec_decode_num_draft_tokens"]


def _perturbed_copy(model: Path, out: Path) -> str:
    """`model` with noise on its LM head: a draft that agrees with it often, not always."""
    shutil.copytree(model, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(8)
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = head + head.std() * torch.randn(head.shape, generator=generator)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_the_first_verified_token_follows_the_target(tiny_model, tmp_path) -> None:
    """End to end, with a draft model unlike the target: the token after the first (the first one a verification
    emits) is distributed as the target's p(t1 | prompt, t0). Pairs (t0, t1) of 1200 requests under top-k 3 against
    p(t0) p(t1 | t0) from the target's own logits; chi-square at significance ALPHA."""
    from test_spec_decode_rejection import ALPHA, chi_square_p_value

    target = str(tiny_model("llama"))
    draft = _perturbed_copy(tiny_model("llama"), tmp_path)
    llm = LLM(target, dtype="float32", max_num_seqs=256, speculative_config={
        "method": "draft", "model": draft, "num_speculative_tokens": 2, **ALWAYS})
    prompt = [11, 27, 301]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 1200, params, use_tqdm=False)
    pairs = torch.tensor([o.outputs[0].token_ids[:2] for o in outs])
    stats = llm.engine.get_stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]

    def top3(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = llm.engine.prompt_logits(ids)[-1]
        top = logits.topk(3)
        return top.indices, top.values.softmax(-1)

    first_ids, first_p = top3(prompt)
    cells, expected = [], []
    for t0, p0 in zip(first_ids.tolist(), first_p.tolist(), strict=True):
        second_ids, second_p = top3(prompt + [t0])
        for t1, p1 in zip(second_ids.tolist(), second_p.tolist(), strict=True):
            cells.append((t0, t1))
            expected.append(p0 * p1)
    index = {cell: i for i, cell in enumerate(cells)}
    observed = torch.tensor([index[(a, b)] for a, b in pairs.tolist()])
    assert chi_square_p_value(observed, torch.tensor(expected)) > ALPHA


def test_a_draft_cache_out_of_blocks_only_stops_proposing(tiny_model, assert_idle) -> None:
    """Sequences whose draft-cache blocks cannot be had decode without drafts (their draft state dropped, caught
    up again later); outputs do not change and every block comes back."""
    path = str(tiny_model("llama"))
    prompts = [{"prompt_token_ids": [3 + i, 40, 41, 42] * 6} for i in range(6)]
    plain = _greedy(LLM(path, dtype="float32"), prompts, max_tokens=40)
    llm = LLM(path, dtype="float32", block_size=8, speculative_config={"method": "draft", "model": path,
                                                                       "num_speculative_tokens": 3, **ALWAYS})
    proposer = llm.engine.scheduler.proposer
    held_back = proposer.free_blocks[:-10]
    del proposer.free_blocks[:-10]  # 10 blocks of 8 tokens: room for about two of the six sequences
    assert _greedy(llm, prompts, max_tokens=40) == plain
    stats = llm.engine.get_stats()
    assert 0 < stats["spec_decode_num_drafts"] and stats["spec_decode_num_accepted_tokens"] > 0
    assert not proposer.states and len(proposer.free_blocks) == 10
    proposer.free_blocks += held_back
    assert_idle(llm)
