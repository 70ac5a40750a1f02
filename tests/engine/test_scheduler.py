"""Scheduler unit tests (no model): token budget, max_num_seqs, FCFS admission, chunked prefill, preemption of
the most recently admitted sequence, and the step's bookkeeping from a (fake) sampled output."""

from __future__ import annotations

import pytest

from microscale.config import SchedulerConfig
from microscale.engine.block_manager import BlockManager
from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.sampler import SampledTokens
from microscale.engine.scheduler import ScheduledChunk, Scheduler
from microscale.engine.sequence import Request, Sequence, SequenceStatus
from microscale.sampling_params import SamplingParams

EOS = 0
MAX_MODEL_LEN = 1024


class LetterTokenizer:
    """Token t is the letter chr(ord('a') + t % 26): enough for detokenizing and stop strings."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in token_ids)


def make_sibling(request: Request, index: int) -> Sequence:
    detokenizer = IncrementalDetokenizer(LetterTokenizer(), request.prompt_token_ids, True,
                                         request.params.stop_strings)
    return Sequence(request, index, detokenizer)


def make_seq(name: str, num_tokens: int, start: int = 1, **params) -> Sequence:
    request = Request(name, None, list(range(start, start + num_tokens)), SamplingParams(**params))
    request.seqs = [make_sibling(request, 0)]
    return request.seqs[0]


def make_scheduler(
    num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, prefix_caching=False, num_host_blocks=0
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching, num_host_blocks)
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, MAX_MODEL_LEN), bm, [EOS], LetterTokenizer())


def sample_step(sched: Scheduler, chunks: list[ScheduledChunk], tokens: list[int], **logprobs) -> list[Request]:
    """Play the model's part after `chunks` were scheduled: the sequences whose chunk reached their end sample
    `tokens` (one each, in order)."""
    sampled = [c.seq for c in chunks if c.samples]
    assert len(sampled) == len(tokens)
    return sched.update_from_output(chunks, sampled, SampledTokens(list(range(len(tokens))), tokens, **logprobs))


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule one step; every sequence whose chunk reached its end samples token 7. Returns {request id: tokens
    computed this step}."""
    chunks = sched.schedule()
    sample_step(sched, chunks, [7] * sum(c.samples for c in chunks))
    return {c.seq.request.request_id: c.num_tokens for c in chunks}


def test_token_budget_chunks_prefills_fcfs():
    sched = make_scheduler(max_tokens=16)
    a, b, c = make_seq("a", 10), make_seq("b", 10, 100), make_seq("c", 10, 200)
    for s in (a, b, c):
        sched.add(s)
    assert run_step(sched) == {"a": 10, "b": 6}  # b's prompt is chunked; c waits
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    assert [s.request.request_id for s in sched.running] == ["a", "b"] and list(sched.waiting) == [c]
    # Running sequences first (a decodes, b finishes its prompt), then c with what is left.
    assert run_step(sched) == {"a": 1, "b": 4, "c": 10}
    assert run_step(sched) == {"a": 1, "b": 1, "c": 1}
    for s in (a, b, c):
        sched.finish(s, "length")
    assert sched.num_unfinished == 0 and sched.block_manager.num_free_blocks == 64


def test_budget_smaller_than_a_block_and_one_token_chunks():
    sched = make_scheduler(max_tokens=3)
    a = make_seq("a", 8)
    sched.add(a)
    steps = [run_step(sched) for _ in range(4)]
    assert steps == [{"a": 3}, {"a": 3}, {"a": 2}, {"a": 1}]
    assert a.num_output_tokens == 2
    sched.finish(a, "length")
    assert sched.block_manager.num_free_blocks == 64


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(str(i), 5, 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert run_step(sched) == {"0": 5, "1": 5}
    sched.finish(seqs[0], "stop")
    assert seqs[0].status == SequenceStatus.FINISHED and seqs[0].finish_reason == "stop"
    assert run_step(sched) == {"1": 1, "2": 5}
    for s in seqs[1:]:
        sched.finish(s, "stop")
    assert sched.block_manager.num_free_blocks == 64


def test_preempts_most_recent_and_recomputes_it_first():
    # 4 blocks of 4 tokens; two sequences of 7 tokens take 2 blocks each; the first decode step fits
    # (8 tokens), the next needs a third block for one of them.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq("a", 7), make_seq("b", 7, 100)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == {"a": 7, "b": 7}
    assert run_step(sched) == {"a": 1, "b": 1}  # 8 tokens each: both blocks full
    assert sched.block_manager.num_free_blocks == 0
    # a needs a block: b (admitted last) is preempted, its blocks freed; nothing is admitted this step.
    assert run_step(sched) == {"a": 1}
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its tokens are kept: it is recomputed, not restarted
    sched.finish(a, "length")
    # b comes back first and recomputes all its tokens (prompt and output) in one chunk.
    sched.add(make_seq("c", 3, 300))
    assert run_step(sched) == {"b": 9, "c": 3}
    for s in list(sched.running):
        sched.finish(s, "length")
    assert sched.block_manager.num_free_blocks == 4


def test_preemption_swaps_out_and_resumes_where_it_stopped():
    # As above, with a swap space: b's blocks are copied out, and back into new blocks when it resumes.
    sched = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=2)
    a, b = make_seq("a", 7), make_seq("b", 7, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)
    b_blocks = list(b.block_table)
    assert run_step(sched) == {"a": 1}
    assert sched.num_preemptions == 1 and sched.num_recomputed_preemptions == 0
    assert sched.swaps.out == list(zip(b_blocks, b.host_blocks)) and sched.swaps.into == []
    assert b.block_table == [] and b.num_computed_tokens == 8  # its KV is kept, in the swap space
    assert list(sched.waiting) == [b]
    sched.finish(a, "length")
    # b resumes with one decode (nothing recomputed): its 2 blocks come back from the swap space.
    host = list(b.host_blocks)
    assert run_step(sched) == {"b": 1}
    assert sched.swaps.out == [] and sched.swaps.into == list(zip(host, b.block_table[:2]))
    assert len(b.block_table) == 3 and b.host_blocks == []
    assert len(sched.block_manager.free_host_blocks) == 2
    sched.finish(b, "length")
    assert sched.block_manager.num_free_blocks == 4


def test_preemption_recomputes_when_the_swap_space_is_full():
    sched = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=1)  # b needs 2 host blocks
    a, b = make_seq("a", 7), make_seq("b", 7, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)
    assert run_step(sched) == {"a": 1}
    assert sched.num_preemptions == 1 and sched.num_recomputed_preemptions == 1
    assert not sched.swaps and b.host_blocks == [] and b.num_computed_tokens == 0
    sched.finish(a, "length")
    assert run_step(sched) == {"b": 9}
    sched.finish(b, "length")
    assert sched.block_manager.num_free_blocks == 4


def test_a_sequence_that_cannot_fit_preempts_itself():
    # Only a alone is running and the cache is full: it is the victim itself and waits.
    sched = make_scheduler(num_blocks=2, block_size=4)
    a = make_seq("a", 8)
    sched.add(a)
    assert run_step(sched) == {"a": 8}
    assert run_step(sched) == {}
    assert sched.num_preemptions == 1 and list(sched.waiting) == [a]
    sched.finish(a, "abort")
    assert sched.num_unfinished == 0 and sched.block_manager.num_free_blocks == 2


def test_admission_reuses_cached_prefix_and_records_hits():
    sched = make_scheduler(block_size=4, prefix_caching=True)
    a = make_seq("a", 10)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    b = make_seq("b", 13)  # same first 10 tokens (8 of them in full blocks), then new ones
    sched.add(b)
    assert run_step(sched) == {"b": 5}  # only the tokens after the 2 cached blocks are computed
    assert b.request.num_cached_tokens == 8
    bm = sched.block_manager
    assert (bm.stats.queries, bm.stats.hits) == (10 + 13, 8)
    sched.finish(b, "stop")
    assert bm.num_free_blocks == 64


def test_admission_with_cached_prefix_waits_for_enough_blocks():
    # The cached prefix is on the free list; reusing it must still leave blocks for the rest of the prompt.
    sched = make_scheduler(num_blocks=6, block_size=4, prefix_caching=True)
    a = make_seq("a", 13)  # 4 blocks, 3 of them full and cached
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    hog = make_seq("hog", 7, 500)  # 2 blocks held: 4 free, 3 of them a's cached prefix
    sched.add(hog)
    run_step(sched)
    b = make_seq("b", 25)  # needs 7 blocks in all: cannot be admitted
    sched.add(b)
    assert run_step(sched) == {"hog": 1}
    assert list(sched.waiting) == [b]
    sched.finish(hog, "stop")
    sched.finish(b, "abort")
    assert sched.block_manager.num_free_blocks == 6


def test_first_scheduled_time_marks_the_end_of_queueing_and_survives_preemption():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 4), make_seq("b", 4, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert a.request.first_scheduled_time is not None and b.request.first_scheduled_time is None
    assert a.request.first_scheduled_time >= a.request.arrival_time
    admitted = a.request.first_scheduled_time
    sched._preempt(sched.running.pop())  # back to the queue: queue time is not measured again
    run_step(sched)
    assert a.request.first_scheduled_time == admitted
    assert a.request.to_output().metrics["first_scheduled_time"] == admitted


def test_num_requests_counts_a_request_once_whatever_its_n():
    sched = make_scheduler()
    parent = make_seq("a", 4)
    sibling = make_sibling(parent.request, 1)
    sched.add(parent)
    sched.add(make_seq("b", 4, 100))
    assert sched.num_requests() == (0, 2)
    run_step(sched)
    sched.add_forked([sibling])
    assert sched.num_requests() == (2, 0)  # a's sibling waits while its parent runs: a counts as running


# ---- update_from_output: the step's bookkeeping -------------------------------------------------------------


def test_update_from_output_computes_chunks_appends_tokens_and_caches_full_blocks():
    sched = make_scheduler(block_size=4, max_tokens=12, prefix_caching=True)
    a, b = make_seq("a", 6), make_seq("b", 10, 100)
    sched.add(a)
    sched.add(b)
    chunks = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 6), (b, 6)]
    touched = sample_step(sched, chunks, [9])  # only a's chunk reaches its end; b's prompt is chunked
    assert touched == [a.request]
    assert (a.num_computed_tokens, a.output_token_ids, a.num_tokens) == (6, [9], 7)
    assert (b.num_computed_tokens, b.num_output_tokens) == (6, 0)
    assert a.request.first_token_time is not None and b.request.first_token_time is None
    bm = sched.block_manager
    assert len(a.block_hashes) == len(b.block_hashes) == 1 and len(bm.hash_to_block) == 2  # full blocks only
    assert sched.num_generated_tokens == 1 and not a.is_finished


def test_update_from_output_finishes_sequences_and_frees_their_blocks():
    sched = make_scheduler(block_size=4)
    length = make_seq("length", 5, max_tokens=2)
    eos = make_seq("eos", 5, 100)
    stop_id = make_seq("stop-id", 5, 200, stop_token_ids=[3])
    stop_str = make_seq("stop-str", 5, 300, stop=["xy"])
    early = make_seq("early-eos", 5, 400, min_tokens=2)
    seqs = [length, eos, stop_id, stop_str, early]
    for s in seqs:
        sched.add(s)
    sample_step(sched, sched.schedule(), [1, EOS, 3, 23, EOS])  # 23 is "x"
    assert [s.finish_reason for s in seqs] == [None, "stop", "stop", None, None]
    assert stop_id.stop_reason == 3 and eos.stop_reason is None
    assert eos.block_table == [] and eos.num_computed_tokens == 0 and eos not in sched.running
    assert sched.running == [length, stop_str, early]
    sample_step(sched, sched.schedule(), [1, 24, EOS])  # 24 is "y"
    assert [s.finish_reason for s in seqs] == ["length", "stop", "stop", "stop", "stop"]
    assert stop_str.stop_reason == "xy" and early.output_token_ids == [EOS, EOS]
    assert all(s.is_finished for s in seqs) and sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == 64


def test_update_from_output_stops_at_max_model_len():
    sched = make_scheduler(num_blocks=MAX_MODEL_LEN // 4)
    a = make_seq("a", MAX_MODEL_LEN - 1, max_tokens=None)
    sched.add(a)
    while not a.is_finished:
        run_step(sched)
    assert a.finish_reason == "length" and a.num_tokens == MAX_MODEL_LEN and a.num_output_tokens == 1


def test_update_from_output_forks_siblings_onto_the_parents_prompt_blocks():
    sched = make_scheduler(block_size=4)
    request = Request("n3", None, list(range(1, 11)), SamplingParams(n=3, max_tokens=4))  # 2 full blocks + 2
    request.seqs = [make_sibling(request, i) for i in range(3)]
    sched.add_request(request)
    parent, *siblings = request.seqs
    assert list(sched.waiting) == [parent] and request.unforked == siblings
    other = make_seq("other", 3, 100)
    sched.add(other)
    sample_step(sched, sched.schedule(), [5, 6])
    assert request.unforked == [] and list(sched.waiting) == siblings
    for s in siblings:  # they share the 2 full prompt blocks and compute the last 2 prompt tokens themselves
        assert s.block_table == parent.block_table[:2] and s.num_computed_tokens == 8 and s.num_output_tokens == 0
    assert [sched.block_manager.ref_counts[b] for b in parent.block_table] == [3, 3, 1]
    assert run_step(sched) == {"n3": 2, "other": 1}  # each sibling runs 2 tokens (dict: the last one's)
    assert [s.output_token_ids for s in siblings] == [[7], [7]]
    assert sched.num_requests() == (2, 0)


def test_update_from_output_assembles_logprobs():
    sched = make_scheduler()
    a = make_seq("a", 3, logprobs=1)
    b = make_seq("b", 3, 100)  # asked for none
    sched.add(a)
    sched.add(b)
    chunks = sched.schedule()
    sample_step(sched, chunks, [2, 4], chosen_logprobs=[-0.5, -0.1], chosen_ranks=[2, 1], top_ids=[[1, 2], [4, 0]],
                top_logprobs=[[-0.3, -0.5], [-0.1, -3.0]])
    entry = a.logprobs[0]
    assert list(entry) == [2, 1]  # the chosen token first, then the top 1
    assert (entry[2].logprob, entry[2].rank, entry[2].decoded_token) == (-0.5, 2, "c")
    assert (entry[1].logprob, entry[1].rank, entry[1].decoded_token) == (-0.3, 1, "b")
    assert a.cumulative_logprob == -0.5 and b.logprobs is None


def test_update_from_output_fails_only_the_requests_a_row_failed_on():
    sched = make_scheduler()
    request = Request("bad", None, [1, 2, 3], SamplingParams(n=2))
    request.seqs = [make_sibling(request, i) for i in range(2)]
    sched.add_request(request)
    good = make_seq("good", 3, 100)
    sched.add(good)
    sample_step(sched, sched.schedule(), [5, 6])
    run_step(sched)  # the sibling's prompt
    chunks = sched.schedule()
    sampled = [c.seq for c in chunks]
    assert sampled == [request.seqs[0], good, request.seqs[1]]
    # Row 2 (the sibling) failed: the whole request is aborted, and its other row's token is not taken.
    touched = sched.update_from_output(chunks, sampled, SampledTokens([0, 1], [8, 8], failed={2: OverflowError()}))
    assert touched == [request, good.request]
    assert request.error == "OverflowError" and request.finished
    assert [s.finish_reason for s in request.seqs] == ["abort", "abort"]
    assert [s.num_output_tokens for s in request.seqs] == [2, 1] and good.output_token_ids == [6, 7, 8]
    assert sched.running == [good]
    sched.finish(good, "stop")
    assert sched.block_manager.num_free_blocks == 64


def test_update_from_output_fails_a_request_whose_detokenizer_raises():
    sched = make_scheduler()
    bad, good = make_seq("bad", 3), make_seq("good", 3, 100)
    for s in (bad, good):
        sched.add(s)

    def broken(token, check_stop=True):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    bad.detokenizer.add_token = broken
    assert sample_step(sched, sched.schedule(), [4, 5]) == [bad.request, good.request]
    assert bad.request.error == "UnicodeDecodeError" and bad.finish_reason == "abort" and bad.block_table == []
    assert good.request.error is None and good.output_token_ids == [5]
    assert sched.num_generated_tokens == 1


class _FailingMatcher:
    """A grammar matcher whose parser fails on the first token it is given (llguidance's error state)."""

    def consume_token(self, token: int) -> bool:
        return False

    def is_error(self) -> bool:
        return True

    def get_error(self) -> str:
        return "parser fuel exhausted"

    def is_stopped(self) -> bool:
        return True  # llguidance says stopped in its error state too: that must not read as a normal end


def test_a_grammar_matcher_error_fails_its_request():
    sched = make_scheduler()
    bad, good = make_seq("bad", 3), make_seq("good", 3, 100)
    for s in (bad, good):
        sched.add(s)
    bad.matcher = _FailingMatcher()
    sample_step(sched, sched.schedule(), [4, 5])
    assert bad.request.error == "GrammarError" and bad.finish_reason == "abort" and bad.block_table == []
    assert good.request.error is None and good.output_token_ids == [5]


def test_score_prompt_borrows_blocks_in_chunks_and_gives_them_back():
    sched = make_scheduler(num_blocks=8, block_size=4, max_tokens=8, prefix_caching=True)
    seen = []

    def forward(chunk: ScheduledChunk) -> int:
        seen.append((chunk.seq.num_computed_tokens, chunk.num_tokens, len(chunk.seq.block_table)))
        return chunk.num_tokens

    assert sched.score_prompt(list(range(1, 21)), forward) == [8, 8, 4]
    assert seen == [(0, 8, 2), (8, 8, 4), (16, 4, 5)]
    bm = sched.block_manager
    assert bm.num_free_blocks == 8 and bm.hash_to_block == {}  # nothing enters the prefix cache

    def failing(chunk: ScheduledChunk) -> int:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError):
        sched.score_prompt(list(range(1, 21)), failing)
    assert bm.num_free_blocks == 8
    with pytest.raises(ValueError, match="no room"):
        sched.score_prompt(list(range(1, 34)), forward)  # 9 blocks


def test_schedule_raises_when_nothing_fits_and_nothing_was_preempted():
    sched = make_scheduler(num_blocks=2, block_size=4)
    sched.add(make_seq("too-long", 9))
    with pytest.raises(RuntimeError, match="No request fits"):
        sched.schedule()
