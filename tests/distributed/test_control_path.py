"""The tensor-parallel control path without NCCL: rank 0 broadcasts each step as host data that every rank
builds on its own device; control messages (and the KV block count) travel over a gloo group whose workers may
idle for as long as the server does, while the model group keeps COLLECTIVE_TIMEOUT; a dead rank 0 still fails
an idle worker at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from microscale import LLM, SamplingParams
from microscale.distributed import parallel_state
from microscale.distributed.parallel_state import (
    COLLECTIVE_TIMEOUT,
    CONTROL_TIMEOUT,
    all_reduce,
    broadcast_from_driver,
    destroy_tensor_parallel,
    init_tensor_parallel,
    min_over_ranks,
)
from microscale.distributed.workers import free_port
from microscale.engine import model_runner
from microscale.engine.model_runner import StepInputs, step_tensors

BLOCK_SIZE = 4
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8]]


class _RecordingWorkers:
    """Stands in for rank 0's handle on the workers: keeps every step it is asked to broadcast."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, step: StepInputs) -> None:
        self.sent.append(step)


def _sent_steps(tiny_model, monkeypatch) -> tuple[list, list]:
    """The steps rank 0 broadcasts while generating (decodes and prefills), and (step, device) of every step it
    built tensors from itself."""
    built = []

    def spy(step, device, block_size):
        built.append((step, device))
        return step_tensors(step, device, block_size)

    # 24 blocks (512 bytes a token: 2 layers x (k, v) x 2 heads x 16 x float32), fewer tokens than max_num_seqs x
    # max_model_len: decodes read paged blocks, as under tensor parallelism.
    llm = LLM(str(tiny_model("llama")), dtype="float32", max_model_len=64, max_num_seqs=2, block_size=BLOCK_SIZE,
              kv_cache_memory=24 * BLOCK_SIZE * 512 / 2**30)
    assert llm.engine.runner.attention_backend.decode_buffer is None
    monkeypatch.setattr(model_runner, "step_tensors", spy)
    workers = llm.engine.runner.workers = _RecordingWorkers()
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    finally:
        llm.engine.runner.workers = None
        llm.shutdown()
    return workers.sent, built


def _host_only(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_host_only(v) for v in value)
    return value is None or isinstance(value, int)


def test_rank_0_broadcasts_host_data_and_builds_its_own_tensors_from_it(tiny_model, monkeypatch):
    sent, built = _sent_steps(tiny_model, monkeypatch)
    assert any(s.prefills for s in sent) and any(s.num_decodes for s in sent)
    # No tensor of rank 0's device goes out: nothing in a message says where it will live.
    assert all(isinstance(s, StepInputs) and _host_only(list(vars(s).values())) for s in sent)
    # Rank 0 runs its forward from the very message it sent, on its own device, as every worker does.
    assert len(built) == len(sent) and all(step is s for (step, _), s in zip(built, sent))
    assert {device for _, device in built} == {torch.device("cpu")}


def test_a_rank_builds_a_step_on_its_own_device(tiny_model, monkeypatch):
    """`meta` stands in for another rank's device: every tensor of the step lands there, not on rank 0's CPU."""
    sent, _ = _sent_steps(tiny_model, monkeypatch)
    meta_device = torch.device("meta")
    for step in sent:
        input_ids, positions, meta, rows = step_tensors(step, meta_device, BLOCK_SIZE)
        tensors = [input_ids, positions, meta.slot_blocks, meta.slot_offsets, rows]
        tensors += [chunk.block_table for chunk in meta.prefills]
        if meta.decode is not None:
            tensors += [meta.decode.positions, meta.decode.paged_block_tables(), meta.decode.context_lens]
        assert all(t.device == meta_device for t in tensors)
        assert [(c.query_start, c.query_len, c.context_start) for c in meta.prefills] == [
            (step.num_decodes + sum(q for q, _, _ in step.prefills[:i]), q, start)
            for i, (q, start, _) in enumerate(step.prefills)
        ]


class _FakeDist:
    """Records the groups torch.distributed is asked to create and the group each collective runs on."""

    def __init__(self, monkeypatch) -> None:
        self.created: list[tuple[str, timedelta]] = []
        self.used: list[tuple[str, object, torch.device | None]] = []
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", self.init_process_group)
        monkeypatch.setattr(dist, "new_group", self.new_group)
        monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: self.used.append(
            ("all_reduce", group, t.device)))
        monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group=None: self.used.append(
            ("broadcast_object_list", group, None)))

    def init_process_group(self, backend: str, init_method: str, rank: int, world_size: int,
                           timeout: timedelta) -> None:
        self.created.append((backend, timeout))

    def new_group(self, backend: str, timeout: timedelta) -> str:
        self.created.append((backend, timeout))
        return "control group"


def test_control_messages_go_over_gloo_with_no_deadline_and_the_model_group_keeps_its_timeout(monkeypatch):
    fake = _FakeDist(monkeypatch)
    init_tensor_parallel(1, 2, "env://", torch.device("cuda", 1))
    try:
        assert fake.created == [("nccl", COLLECTIVE_TIMEOUT), ("gloo", CONTROL_TIMEOUT)]
        assert CONTROL_TIMEOUT >= timedelta(days=3650)  # an idle server is never timed out
        broadcast_from_driver()
        min_over_ranks(7)
        all_reduce(torch.ones(2))
    finally:
        destroy_tensor_parallel()
    cpu = torch.device("cpu")
    assert fake.used == [
        ("broadcast_object_list", "control group", None),  # where idle workers wait
        ("all_reduce", "control group", cpu),  # the KV block count: a host int, never on NCCL
        ("all_reduce", None, cpu),  # the forward's collectives: the model group
    ]
    assert parallel_state.tp_size() == 1


def _rank_0(init_method: str, ready) -> None:
    init_tensor_parallel(0, 2, init_method, torch.device("cpu"))
    broadcast_from_driver("step")
    ready.put("sent")
    signal.pause()  # alive until the test kills it


def _idle_worker(init_method: str, received) -> None:
    init_tensor_parallel(1, 2, init_method, torch.device("cpu"))
    try:
        while (message := broadcast_from_driver()) is not None:
            received.put(message)
    except RuntimeError as e:
        received.put(f"failed: {e}")


def test_a_dead_rank_0_does_not_leave_an_idle_worker_hanging():
    """The control group's wait has no deadline, yet a worker is not left hanging by a dead rank 0."""
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ready, received = ctx.Queue(), ctx.Queue()
    driver = ctx.Process(target=_rank_0, args=(init_method, ready), daemon=True)
    worker = ctx.Process(target=_idle_worker, args=(init_method, received), daemon=True)
    driver.start()
    worker.start()
    try:
        # Generous bounds, only so that a broken build fails instead of hanging the suite.
        assert ready.get(timeout=300) == "sent" and received.get(timeout=300) == "step"
        os.kill(driver.pid, signal.SIGKILL)
        assert received.get(timeout=300).startswith("failed: ")
    finally:
        for process in (driver, worker):
            process.kill()
            process.join()
