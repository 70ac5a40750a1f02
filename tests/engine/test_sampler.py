"""Sampler: the penalty and top-k/top-p functions against straightforward per-row references, the Sampler on
hand-made batches (greedy, blocked tokens, logprobs, seeds, min_p, the sampled distribution), then sampling
parameters end to end through LLM.generate on a tiny random model."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.engine.sampler import (
    Penalties,
    SampledTokens,
    Sampler,
    SamplerOutput,
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p,
    sample,
)
from microscale.engine.sequence import Request, Sequence

NEG_INF = float("-inf")


# ---- references ------------------------------------------------------------------------------------------


def ref_penalties(logits, output_ids, prompt_ids, rep, presence, freq):
    out = logits.clone()
    for r in range(logits.shape[0]):
        counts = Counter(output_ids[r])
        prompt = set(prompt_ids[r])
        for t in range(logits.shape[1]):
            x = out[r, t].item()
            if t in prompt or counts[t]:
                x = x / rep[r] if x > 0 else x * rep[r]
            x -= freq[r] * counts[t] + presence[r] * (counts[t] > 0)
            out[r, t] = x
    return out


def ref_top_k_top_p(row: list[float], k: int, p: float) -> set[int]:
    """Indices kept: the k largest (k = 0: all), then the smallest set of the most likely of those whose
    probability (renormalised over the kept ones) reaches p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if k > 0:
        order = order[:k]
    z = sum(math.exp(row[i]) for i in order)
    kept, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        kept.add(i)
        mass += math.exp(row[i]) / z
    return kept


def make_batch(temps, top_k=None, top_p=None, min_p=None, seeded=None, penalties=None, blocked=None, logprobs=None):
    return SamplingBatch(
        temperature=torch.tensor(temps, dtype=torch.float32),
        all_greedy=all(t == 0 for t in temps),
        top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int64),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32),
        min_p=None if min_p is None else torch.tensor(min_p, dtype=torch.float32),
        seeded=seeded or {},
        penalties=penalties,
        blocked=blocked,
        num_logprobs=logprobs,
    )


def pad(rows, value):
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


# ---- functions ---------------------------------------------------------------------------------------------


def test_apply_penalties_matches_reference():
    g = torch.Generator().manual_seed(0)
    rows, vocab = 5, 12
    logits = torch.randn(rows, vocab, generator=g) * 3
    rng = random.Random(0)
    outputs = [[rng.randrange(vocab) for _ in range(n)] for n in (0, 1, 4, 9, 3)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 0, 5, 2, 7)]
    rep = [1.0, 1.3, 0.7, 2.0, 1.0]
    presence = [0.0, 0.5, -0.4, 1.5, 0.0]
    freq = [0.0, 0.2, 0.3, -0.5, 1.1]
    pen = Penalties(
        output_ids=pad(outputs, vocab),
        prompt_ids=pad(prompts, vocab),
        repetition=torch.tensor(rep),
        presence=torch.tensor(presence),
        frequency=torch.tensor(freq),
    )
    got = apply_penalties(logits.clone(), pen)
    expected = ref_penalties(logits, outputs, prompts, rep, presence, freq)
    torch.testing.assert_close(got, expected)


def test_apply_penalties_neutral_values_change_nothing():
    logits = torch.randn(2, 8)
    pen = Penalties(pad([[1, 2, 2], [3]], 8), pad([[4], [5, 6]], 8), torch.ones(2), torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(apply_penalties(logits.clone(), pen), logits)


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [
        ([3, 0, 1, 7, 20, 0], None),
        (None, [0.5, 0.9, 1.0, 1e-6, 0.3, 0.999]),
        ([3, 0, 1, 7, 20, 5], [0.5, 0.9, 1.0, 0.2, 0.7, 0.999]),
    ],
)
def test_apply_top_k_top_p_matches_reference(top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=g) * 2
    got = apply_top_k_top_p(
        logits.clone(),
        None if top_k is None else torch.tensor(top_k),
        None if top_p is None else torch.tensor(top_p),
    )
    for r in range(6):
        kept = ref_top_k_top_p(logits[r].tolist(), top_k[r] if top_k else 0, top_p[r] if top_p else 1.0)
        assert {i for i in range(20) if got[r, i] != NEG_INF} == kept, f"row {r}"
        for i in kept:
            assert got[r, i] == logits[r, i]  # kept logits are untouched, in their own positions


# ---- the Sampler on hand-made batches ---------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_even_in_a_mixed_batch():
    logits = torch.randn(4, 50)
    out = Sampler()(logits.clone(), make_batch([0.0, 1.0, 0.0, 0.7]))
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert out.chosen_logprobs is None


def test_blocked_tokens_are_never_chosen():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 10.0  # the favourite, blocked in row 0 (e.g. eos before min_tokens)
    logits[:, 5] = 9.0
    out = Sampler()(logits, make_batch([0.0, 0.0], blocked=([0], [3])))
    assert out.token_ids.tolist() == [5, 3]
    logits = torch.zeros(64, 4)
    logits[:, 1] = 3.0
    out = Sampler()(logits, make_batch([1.0] * 64, blocked=(list(range(64)), [1] * 64)))
    assert 1 not in out.token_ids.tolist()


def test_blocked_tokens_with_logits_from_inference_mode():
    """The model runs under torch.inference_mode; the sampler must not write into its float32 logits."""
    with torch.inference_mode():
        logits = torch.zeros(1, 10)
        logits[0, 3] = 10.0
    for temps in ([0.0], [1.0]):
        out = Sampler()(logits, make_batch(temps, blocked=([0], [3]), logprobs=1))
        assert out.token_ids.item() != 3
    assert logits[0, 3] == 10.0


def test_penalised_greedy():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    pen = Penalties(pad([[0]], 3), pad([[2]], 3), torch.tensor([2.0]), torch.zeros(1), torch.zeros(1))
    assert Sampler()(logits, make_batch([0.0], penalties=pen)).token_ids.tolist() == [1]  # 5/2 < 4


def test_logprobs_are_the_models_before_penalties_and_temperature():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 30, generator=g)
    pen = Penalties(pad([[1], [], [2, 2]], 30), pad([[], [], []], 30), torch.full((3,), 1.5), torch.zeros(3),
                    torch.full((3,), 0.5))
    out = Sampler()(logits.clone(), make_batch([0.0, 0.8, 1.3], penalties=pen, logprobs=4))
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(out.chosen_logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    top, ids = ref.topk(4, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top)
    assert out.top_ids.tolist() == ids.tolist()
    for r in range(3):
        assert out.chosen_ranks[r] == 1 + (ref[r] > ref[r, out.token_ids[r]]).sum()


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 100, generator=g)

    def draw(rows: list[int], seeded_row: int) -> int:
        batch = make_batch([1.0] * len(rows), seeded={rows.index(seeded_row): torch.Generator().manual_seed(7)})
        return Sampler()(logits[rows].clone(), batch).token_ids[rows.index(seeded_row)].item()

    alone = draw([2], 2)
    assert draw([0, 1, 2, 3], 2) == alone
    assert draw([5, 2], 2) == alone
    # A different seed gives (for some seed) a different token: the seed is really used.
    batch = [make_batch([1.0], seeded={0: torch.Generator().manual_seed(s)}) for s in range(20)]
    assert len({Sampler()(logits[[2]].clone(), b).token_ids.item() for b in batch}) > 1


def test_sampled_frequencies_follow_softmax_with_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 8000
    torch.manual_seed(0)
    for temp in (1.0, 0.5, 2.0):
        logits = probs.log().expand(rows, 4).clone()
        out = Sampler()(logits, make_batch([temp] * rows)).token_ids
        freq = torch.bincount(out, minlength=4).float() / rows
        expected = (probs.log() / temp).softmax(-1)
        torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)


def test_top_k_one_and_tiny_top_p_and_min_p_one_are_greedy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(200, 50, generator=g)
    argmax = logits.argmax(-1)
    torch.manual_seed(0)
    n = logits.shape[0]
    assert torch.equal(Sampler()(logits.clone(), make_batch([1.0] * n, top_k=[1] * n)).token_ids, argmax)
    assert torch.equal(Sampler()(logits.clone(), make_batch([1.0] * n, top_p=[1e-6] * n)).token_ids, argmax)
    assert torch.equal(Sampler()(logits.clone(), make_batch([1.0] * n, min_p=[1.0] * n)).token_ids, argmax)


def test_min_p_keeps_only_tokens_above_the_floor():
    probs = torch.tensor([0.4, 0.25, 0.19, 0.1, 0.06])
    rows = 4000
    torch.manual_seed(0)
    out = Sampler()(probs.log().expand(rows, 5).clone(), make_batch([1.0] * rows, min_p=[0.5] * rows)).token_ids
    seen = set(out.tolist())
    assert seen == {0, 1}  # p >= 0.5 * 0.4
    # Renormalised over the kept ones.
    assert abs((out == 0).float().mean().item() - 0.4 / 0.65) < 0.03


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    torch.manual_seed(0)
    out = Sampler()(probs.log().expand(rows, 4).clone(), make_batch([1.0] * rows, top_p=[0.7] * rows)).token_ids
    assert set(out.tolist()) == {0, 1}
    assert abs((out == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_sampling_batch_build():
    def seq(prompt, output, **params):
        s = Sequence(Request("r", None, prompt, SamplingParams(**params)), 0, detokenizer=None)
        s.token_ids += output
        return s.sampling_row()

    seqs = [
        seq([5, 6], [7], temperature=0),
        seq([8], [], temperature=0.5, top_k=3, min_tokens=2, stop_token_ids=[9], seed=1),
        seq([1, 2, 3], [4, 4], repetition_penalty=1.2, min_tokens=2, ignore_eos=True, logprobs=2),
        seq([1], [2], top_p=0.5, min_p=0.1, logprobs=5, frequency_penalty=0.5),
    ]
    b = SamplingBatch.build(seqs, eos_ids=[0, 2], vocab_size=10, device=torch.device("cpu"))
    assert b.temperature.tolist() == [0.0, 0.5, 1.0, 1.0] and not b.all_greedy
    assert b.top_k.tolist() == [0, 3, 0, 0]
    assert b.top_p.tolist() == [1.0, 1.0, 1.0, 0.5]
    assert b.min_p.tolist() == pytest.approx([0, 0, 0, 0.1])
    assert list(b.seeded) == [1]
    assert b.num_logprobs == 5
    # min_tokens: row 1 (no output yet) may not end (eos ids and its stop id); row 2 ignores eos and has no
    # stop ids: nothing blocked.
    assert sorted(zip(*b.blocked)) == [(1, 0), (1, 2), (1, 9)]
    pen = b.penalties
    assert pen.output_ids.tolist() == [[7, 10], [10, 10], [4, 4], [2, 10]]
    assert pen.prompt_ids.tolist() == [[5, 6, 10], [8, 10, 10], [1, 2, 3], [1, 10, 10]]
    assert pen.repetition.tolist() == pytest.approx([1, 1, 1.2, 1])
    assert pen.frequency.tolist() == [0, 0, 0, 0.5]
    greedy = SamplingBatch.build(seqs[:1], [0], 10, torch.device("cpu"))
    assert greedy.all_greedy and greedy.top_k is None and greedy.penalties is None and greedy.blocked is None


def test_sample_reports_the_rows_that_fail_alone_and_samples_the_others():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    unfit = SamplingParams(temperature=0)
    unfit.top_k = 2**63  # past validation (which refuses it): its tensor cannot hold it
    rows = [SamplingRow(SamplingParams(temperature=0), [1], 1), SamplingRow(unfit, [1], 1),
            SamplingRow(SamplingParams(temperature=0, logprobs=2), [1, 2], 1)]
    out = sample(Sampler(), logits, rows, eos_ids=[0], vocab_size=10)
    assert list(out.failed) == [1]
    assert out.rows == [0, 2] and out.token_ids == logits[[0, 2]].argmax(dim=-1).tolist()
    assert out.chosen_ranks == [1, 1] and len(out.top_ids[1]) == 2
    assert sample(Sampler(), logits, [], [0], 10) == SampledTokens([], [])


def test_sample_raises_an_error_no_row_causes_alone(monkeypatch):
    def broken(self, logits, batch):
        if logits.shape[0] > 1:  # the engine's own fault, not any request's: each row alone samples
            raise RuntimeError("device lost")
        return SamplerOutput(logits.argmax(dim=-1))

    monkeypatch.setattr(Sampler, "__call__", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        sample(Sampler(), torch.zeros(2, 4), [SamplingRow(SamplingParams(), [1], 1)] * 2, [0], 4)


# ---- through the engine ---------------------------------------------------------------------------------------

PROMPTS = [{"prompt_token_ids": [random.Random(i).randrange(3, 4096) for _ in range(5 + 7 * i)]} for i in range(6)]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model(), dtype=torch.float32, max_model_len=256, max_num_seqs=32, seed=0)


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(outputs):
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = tokens(gen(llm, PROMPTS[2], params))
    assert tokens(gen(llm, PROMPTS[2], params)) == alone
    # Batched with other (seeded and unseeded) requests, at another position.
    others = [SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=99, max_tokens=5, ignore_eos=True)]
    batched = gen(llm, [PROMPTS[0], PROMPTS[5], PROMPTS[2]], others + [params])
    assert tokens(batched[2:]) == alone
    other_seed = SamplingParams(temperature=1.0, seed=4321, max_tokens=12, ignore_eos=True)
    assert tokens(gen(llm, PROMPTS[2], other_seed)) != alone
    # Unseeded sampling is random.
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert tokens(gen(llm, PROMPTS[2], unseeded)) != tokens(gen(llm, PROMPTS[2], unseeded))


def test_n_samples_differ_and_are_reproducible(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    out = gen(llm, PROMPTS[3], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 10 for s in samples)
    assert len(set(samples)) == 4
    assert [tuple(c.token_ids) for c in gen(llm, PROMPTS[3], params)[0].outputs] == samples
    # Unseeded n=4 also gives 4 different samples.
    unseeded = gen(llm, PROMPTS[3], SamplingParams(n=4, temperature=1.0, max_tokens=10, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in unseeded.outputs}) == 4


@pytest.mark.parametrize("length", [12, 32, 33, 40])
def test_n_samples_equal_single_requests(llm, length):
    """Siblings share the parent's full prompt blocks (fork): sample i of a request seeded s is what a single
    request seeded s + i draws, and n greedy samples are the greedy output n times."""
    prompt = {"prompt_token_ids": [random.Random(length).randrange(3, 4096) for _ in range(length)]}
    out = gen(llm, prompt, SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))[0]
    single = gen(llm, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [single.outputs[0].token_ids] * 3
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    out = gen(llm, prompt, SamplingParams(n=3, seed=10, **sampled))[0]
    singles = gen(llm, [prompt] * 3, [SamplingParams(seed=10 + i, **sampled) for i in range(3)])
    assert [c.token_ids for c in out.outputs] == [o.outputs[0].token_ids for o in singles]


def test_n_with_one_token(llm):
    out = gen(llm, PROMPTS[4], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=1, ignore_eos=True))[0]
    assert [len(c.token_ids) for c in out.outputs] == [1, 1, 1] and out.finished
    assert all(c.finish_reason == "length" for c in out.outputs)


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, top_p=0.5, min_p=0.3)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1", "all"],
)
def test_degenerate_filters_equal_greedy(llm, params):
    greedy = tokens(gen(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)))
    sampled = tokens(gen(llm, PROMPTS, SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, **params)))
    assert sampled == greedy


def repeats(token_lists) -> int:
    """Generated tokens that already occurred earlier in the same output."""
    return sum(len(t) - len(set(t)) for t in token_lists)


def test_penalties_change_outputs_in_the_expected_direction(llm):
    base = dict(temperature=0, max_tokens=24, ignore_eos=True)
    plain = tokens(gen(llm, PROMPTS, SamplingParams(**base)))
    assert repeats(plain) > 10  # the tiny random model loops: something for the penalties to act on
    for penalty in (dict(repetition_penalty=5.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        penalised = tokens(gen(llm, PROMPTS, SamplingParams(**base, **penalty)))
        assert repeats(penalised) < repeats(plain) / 2, penalty
    more = tokens(gen(llm, PROMPTS, SamplingParams(**base, frequency_penalty=-2.0)))
    assert repeats(more) > repeats(plain)
    # repetition_penalty also covers prompt tokens: repeat a prompt token over and over and it is avoided.
    prompt = {"prompt_token_ids": [7, 8, 9] * 10}
    echo = tokens(gen(llm, prompt, SamplingParams(**base)))[0]
    shy = tokens(gen(llm, prompt, SamplingParams(**base, repetition_penalty=100.0)))[0]
    assert not {7, 8, 9} & set(shy)
    assert len(set(shy)) >= len(set(echo))
