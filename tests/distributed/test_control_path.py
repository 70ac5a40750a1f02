"""The tensor-parallel control path without NCCL: control messages (and the KV block count) travel over a gloo
group whose workers may idle for as long as the server does, while the model group keeps COLLECTIVE_TIMEOUT; a
dead rank 0 still fails an idle worker at once. (What rank 0 broadcasts: tests/engine/test_executor.py.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from microscale.distributed import parallel_state
from microscale.distributed.launch import free_port
from microscale.distributed.parallel_state import (
    COLLECTIVE_TIMEOUT,
    CONTROL_TIMEOUT,
    all_reduce,
    broadcast_from_driver,
    destroy_tensor_parallel,
    init_tensor_parallel,
    min_over_ranks,
)


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
