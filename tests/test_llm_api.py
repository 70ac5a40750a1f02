"""The offline LLM API and the engine API on a tiny random float32 model: prompt forms, finish reasons
(stop strings, stop token ids, eos, max_tokens, max_model_len, min_tokens) as in vLLM, logprobs against
transformers' own logits, abort and errors without leaked KV blocks, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.engine.engine import LLMEngine

MAX_MODEL_LEN = 256
GREEDY = dict(temperature=0, ignore_eos=True)
TEXT_PROMPTS = ["def fibonacci(n):", "import os\n", "héllo 世界", "class Foo:\n    pass\n"]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype=torch.float32, max_model_len=MAX_MODEL_LEN, max_num_seqs=16)


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy outputs (24 tokens, no stop conditions) of each text prompt."""
    outs = llm.generate(TEXT_PROMPTS, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
    return [o.outputs[0] for o in outs]


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


# ---- prompts and outputs -----------------------------------------------------------------------------------


def test_prompt_forms_and_output_order(llm, reference):
    tok = llm.get_tokenizer()
    ids = tok.encode(TEXT_PROMPTS[1])
    params = SamplingParams(max_tokens=24, **GREEDY)
    forms = [TEXT_PROMPTS[1], ids, {"prompt_token_ids": ids}, {"prompt": TEXT_PROMPTS[1]}]
    for form in forms:
        (out,) = gen(llm, form, params)
        assert out.outputs[0].token_ids == reference[1].token_ids
        assert out.outputs[0].text == reference[1].text
        assert out.prompt_token_ids == ids and out.finished
    assert gen(llm, TEXT_PROMPTS[1], params)[0].prompt == TEXT_PROMPTS[1]
    # A batch comes back in prompt order, each with its own params.
    per_prompt = [SamplingParams(max_tokens=m, **GREEDY) for m in (5, 1, 24, 3)]
    outs = gen(llm, list(reversed(TEXT_PROMPTS)), per_prompt)
    assert [o.prompt for o in outs] == list(reversed(TEXT_PROMPTS))
    for o, ref, sp in zip(outs, reversed(reference), per_prompt):
        assert o.outputs[0].token_ids == ref.token_ids[: sp.max_tokens]
    assert len({o.request_id for o in outs}) == 4
    with pytest.raises(ValueError, match="sampling params"):
        gen(llm, TEXT_PROMPTS, per_prompt[:2])


def test_text_is_the_decoded_tokens(llm, reference):
    tok = llm.get_tokenizer()
    for ref in reference:
        assert ref.text == tok.decode(ref.token_ids)
        assert ref.finish_reason == "length" and ref.stop_reason is None
        assert ref.logprobs is None and ref.cumulative_logprob is None


def test_chat(llm):
    messages = [{"role": "user", "content": "hi"}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == llm.get_tokenizer().encode(out.prompt, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 4
    two = llm.chat([messages, messages], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2


# ---- finish reasons ------------------------------------------------------------------------------------------


def pick_stop_string(text: str, length: int = 3, start: int = 4) -> tuple[str, int]:
    """A substring of `text` (no replacement characters) whose first occurrence is at its position."""
    for a in range(start, len(text) - length):
        stop = text[a : a + length]
        if "\ufffd" not in stop and text.find(stop) == a:
            return stop, a
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string(llm, reference, include):
    tok = llm.get_tokenizer()
    for prompt, ref in zip(TEXT_PROMPTS, reference):
        stop, at = pick_stop_string(ref.text)
        params = SamplingParams(max_tokens=24, stop=[stop, "never-there"], include_stop_str_in_output=include, **GREEDY)
        (out,) = gen(llm, prompt, params)
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == (ref.text[: at + len(stop)] if include else ref.text[:at])
        # Generation ended at the token that completed the stop string.
        n = len(c.token_ids)
        assert c.token_ids == ref.token_ids[:n]
        assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])


def test_stop_string_in_the_prompt_does_not_count(llm, reference):
    stop = "fibonacci"
    assert stop in TEXT_PROMPTS[0] and stop not in reference[0].text
    c = gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=24, stop=stop, **GREEDY))[0].outputs[0]
    assert c.finish_reason == "length" and c.text == reference[0].text


def test_stop_string_never_leaks_while_streaming(llm, reference):
    """Through the engine API, step by step: the streamed text never shows the stop string or a piece of it
    that turns out to be one."""
    engine = llm.engine
    stop, at = pick_stop_string(reference[0].text, length=4)
    request = engine.add_request("stream", TEXT_PROMPTS[0], SamplingParams(max_tokens=24, stop=stop, **GREEDY))
    seq, streamed, texts = request.seqs[0], "", []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        streamed += seq.detokenizer.new_text(seq.is_finished)
        assert stop not in streamed
        for o in outputs:
            assert o.finished == (o.outputs[0].finish_reason is not None)
            texts.append(o.outputs[0].text)
    final = reference[0].text[:at]
    assert streamed == final == seq.detokenizer.output_text == texts[-1]
    # Every intermediate output is a prefix of the final text: no piece of the stop string ever shows.
    for text in texts:
        assert final.startswith(text), (text, final)


def test_stop_token_ids(llm, reference):
    ref = reference[0]
    k = next(i for i in range(2, 24) if ref.token_ids[i] not in ref.token_ids[:i])
    stop_id = ref.token_ids[k]
    (out,) = gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=24, stop_token_ids=[stop_id], **GREEDY))
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == ref.token_ids[: k + 1]  # the stop token is the last one returned
    # min_tokens suppresses it until reached.
    (out,) = gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=24, stop_token_ids=[stop_id], min_tokens=k + 2,
                                                      **GREEDY))
    c = out.outputs[0]
    assert len(c.token_ids) >= k + 2 and stop_id not in c.token_ids[: k + 2]
    assert c.finish_reason == ("stop" if c.token_ids[-1] == stop_id else "length")


def test_min_tokens_suppresses_stop_strings(llm, reference):
    ref = reference[0]
    stop, at = pick_stop_string(ref.text)
    tok = llm.get_tokenizer()
    needed = next(n for n in range(1, 25) if stop in tok.decode(ref.token_ids[:n]))
    params = SamplingParams(max_tokens=24, min_tokens=needed + 1, stop=stop, **GREEDY)
    c = gen(llm, TEXT_PROMPTS[0], params)[0].outputs[0]
    # The stop string's first appearance is inside the first min_tokens tokens: it does not count.
    assert len(c.token_ids) > needed
    assert c.token_ids[:needed] == ref.token_ids[:needed]


def test_max_tokens_and_max_model_len(llm):
    (out,) = gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=7, **GREEDY))
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].stop_reason is None
    prompt = {"prompt_token_ids": list(range(10, 10 + MAX_MODEL_LEN - 5))}
    (out,) = gen(llm, prompt, SamplingParams(max_tokens=None, **GREEDY))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def eos_setup(model_dir, llm, tmp_path_factory):
    """A copy of the model whose generation_config.json names as eos a token greedy decoding emits at
    output position k (and not before)."""
    prompt = TEXT_PROMPTS[1]
    ref = gen(llm, prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0].token_ids
    k = next(i for i in range(2, 24) if ref[i] not in ref[:i])
    eos_dir = tmp_path_factory.mktemp("eos-model")
    shutil.copytree(model_dir, eos_dir, dirs_exist_ok=True)
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [ref[k]]}))
    eos_llm = LLM(eos_dir, dtype=torch.float32, max_model_len=MAX_MODEL_LEN)
    assert eos_llm.engine.eos_token_ids == [ref[k]]
    return eos_llm, prompt, ref, k


def test_eos(eos_setup):
    eos_llm, prompt, ref, k = eos_setup
    c = gen(eos_llm, prompt, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.token_ids == ref[: k + 1]  # eos is the last token id
    c = gen(eos_llm, prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "length" and c.token_ids == ref
    # min_tokens: eos may not be sampled before min_tokens tokens.
    c = gen(eos_llm, prompt, SamplingParams(temperature=0, max_tokens=24, min_tokens=k + 3))[0].outputs[0]
    assert len(c.token_ids) > k + 3 or c.finish_reason == "length"
    assert ref[k] not in c.token_ids[: k + 3] and c.token_ids[:k] == ref[:k]
    # eos in stop_token_ids too: still reported as eos (stop_reason None), as in vLLM.
    c = gen(eos_llm, prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[k]]))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None and c.token_ids == ref[: k + 1]


# ---- logprobs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_log_softmax_of_the_models_logits(llm, hf_model, temperature):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=10, logprobs=3, ignore_eos=True)
    outs = gen(llm, TEXT_PROMPTS[:2], params)
    for out in outs:
        c = out.outputs[0]
        ids = out.prompt_token_ids + c.token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
        ref = logits.log_softmax(-1)[len(out.prompt_token_ids) - 1 : -1]  # the rows that predicted the outputs
        assert len(c.logprobs) == len(c.token_ids) == 10
        total = 0.0
        for pos, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            top = ref[pos].topk(3)
            assert token in entry
            assert set(top.indices.tolist()) <= set(entry)
            assert len(entry) == 3 + (token not in top.indices.tolist())
            for tid, lp in entry.items():
                assert lp.logprob == pytest.approx(ref[pos, tid].item(), abs=1e-4)
                assert lp.rank == 1 + int((ref[pos] > ref[pos, tid]).sum())
                assert lp.decoded_token == tok.decode([tid])
            if temperature == 0:
                assert entry[token].rank == 1
            total += entry[token].logprob
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_zero_gives_the_chosen_token_only(llm):
    c = gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=3, logprobs=0, **GREEDY))[0].outputs[0]
    assert [list(d) for d in c.logprobs] == [[t] for t in c.token_ids]


# ---- abort, errors mid-run, and the engine API -----------------------------------------------------------------


def test_engine_api_streams_and_finishes(llm, reference):
    engine = llm.engine
    engine.add_request("a", TEXT_PROMPTS[2], SamplingParams(max_tokens=5, **GREEDY))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", TEXT_PROMPTS[2], SamplingParams(max_tokens=5, **GREEDY))
    seen = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen.append((len(o.outputs[0].token_ids), o.finished, o.outputs[0].finish_reason))
    assert seen == [(1, False, None), (2, False, None), (3, False, None), (4, False, None), (5, True, "length")]


@pytest.mark.parametrize(
    ("params", "steps"),
    [
        (SamplingParams(max_tokens=50, **GREEDY), 3),  # decoding
        (SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=50, ignore_eos=True), 3),  # forked siblings
        (SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=50, ignore_eos=True), 0),  # not scheduled yet
    ],
    ids=["decoding", "n=3", "waiting"],
)
def test_abort_mid_generation_frees_everything(llm, assert_idle, params, steps):
    engine = llm.engine
    prompt = {"prompt_token_ids": list(range(100, 170))}
    engine.add_request("keep", TEXT_PROMPTS[0], SamplingParams(max_tokens=8, **GREEDY))
    request = engine.add_request("victim", prompt, params)
    for _ in range(steps):
        engine.step()
    if steps:
        assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
        assert all(s.block_table for s in request.seqs)  # siblings forked and sharing the prompt blocks
    engine.abort_request("victim")
    engine.abort_request("victim")  # twice, or an unknown id: nothing happens
    engine.abort_request("no-such-request")
    assert all(s.finish_reason == "abort" for s in request.seqs)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["keep"]
    assert_idle(engine)


def test_abort_during_chunked_prefill(model_dir, assert_idle):
    llm = LLM(model_dir, dtype=torch.float32, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("long", {"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=4))
    engine.step()
    engine.step()
    assert engine.requests["long"].seqs[0].num_computed_tokens == 32
    engine.abort_request("long")
    assert_idle(engine)
    # The engine is still usable, and the half-computed prompt left nothing wrong in the prefix cache.
    out = gen(llm, {"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=4, **GREEDY))
    fresh = LLM(model_dir, dtype=torch.float32, max_model_len=MAX_MODEL_LEN)
    ref = gen(fresh, {"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=4, **GREEDY))
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


def test_error_during_generate_aborts_its_requests(llm, assert_idle, monkeypatch):
    engine = llm.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        gen(llm, TEXT_PROMPTS, SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True))
    assert_idle(engine)
    monkeypatch.undo()
    assert len(gen(llm, TEXT_PROMPTS[0], SamplingParams(max_tokens=2, **GREEDY))[0].outputs[0].token_ids) == 2


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["", {"prompt_token_ids": []}, {"prompt": ""}, ["ok", ""]],
    ids=["empty-string", "empty-ids", "empty-dict-prompt", "one-of-two"],
)
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match="empty"):
        gen(llm, prompt, SamplingParams(max_tokens=4))


def test_prompt_too_long(llm):
    for n in (MAX_MODEL_LEN, MAX_MODEL_LEN + 50):
        with pytest.raises(ValueError, match="max_model_len"):
            gen(llm, {"prompt_token_ids": [5] * n}, SamplingParams(max_tokens=4))
    # One bad prompt fails the whole call before anything starts.
    with pytest.raises(ValueError, match="max_model_len"):
        gen(llm, [TEXT_PROMPTS[0], {"prompt_token_ids": [5] * MAX_MODEL_LEN}], SamplingParams(max_tokens=4))
    assert not llm.engine.requests


def test_bad_token_ids_and_prompt_types(llm):
    with pytest.raises(ValueError, match="token ids"):
        gen(llm, {"prompt_token_ids": [1, 2, 4096]}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="token ids"):
        gen(llm, {"prompt_token_ids": [-1]}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        gen(llm, {"text": "x"}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError):
        gen(llm, [3.5], SamplingParams(max_tokens=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(n=0), "n must"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_good_sampling_params_edge_values():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_p=1.0, max_tokens=1, min_p=1.0, stop="x").stop_strings == ["x"]
    assert SamplingParams(temperature=0).greedy


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        LLM(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ValueError, match="not a folder"):
        LLM("./no-such-model-dir")


def test_folder_without_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError):
        LLM(str(f))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(block_size=0), "block_size"),
        (dict(kv_cache_memory=-1.0), "kv_cache_memory"),
        (dict(kv_cache_memory=1e-7), "KV cache"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(dtype="float8"), "dtype"),
        (dict(load_format="pickle"), "load_format"),
    ],
)
def test_bad_engine_args(model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(model_dir, max_model_len=MAX_MODEL_LEN, **kwargs)


def test_engine_class_is_what_llm_uses(llm):
    assert isinstance(llm.engine, LLMEngine)


def test_threads_sets_the_engines_cpu_threads(model_dir):
    before = torch.get_num_threads()
    try:
        LLM(model_dir, dtype=torch.float32, max_model_len=MAX_MODEL_LEN, threads=before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        LLM(model_dir, threads=0)
