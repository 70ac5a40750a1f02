"""Scheduler unit tests (no model): token budget, max_num_seqs, FCFS admission, chunked prefill and
preemption of the most recently admitted sequence."""

from __future__ import annotations

from microscale.config import SchedulerConfig
from microscale.engine.block_manager import BlockManager
from microscale.engine.scheduler import Scheduler
from microscale.engine.sequence import Request, Sequence, SequenceStatus
from microscale.sampling_params import SamplingParams


def make_seq(name: str, num_tokens: int, start: int = 1) -> Sequence:
    ids = list(range(start, start + num_tokens))
    return Sequence(Request(name, None, ids, SamplingParams()), 0, detokenizer=None)


def make_scheduler(
    num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, prefix_caching=False, num_host_blocks=0
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching, num_host_blocks)
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, 1024), bm)


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule one step and play the engine's part: advance the computed counters, append a token to
    sequences whose chunk reached their end. Returns {request id: tokens computed this step}."""
    chunks = sched.schedule()
    for c in chunks:
        sampled = c.samples
        c.seq.num_computed_tokens += c.num_tokens
        sched.block_manager.cache_full_blocks(c.seq)
        if sampled:
            c.seq.token_ids.append(7)
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
    sibling = Sequence(parent.request, 1, detokenizer=None)
    sched.add(parent)
    sched.add(make_seq("b", 4, 100))
    assert sched.num_requests() == (0, 2)
    run_step(sched)
    sched.add_forked([sibling])
    assert sched.num_requests() == (2, 0)  # a's sibling waits while its parent runs: a counts as running
