"""The executor, rank 0's handle on every rank: it broadcasts each step as host data that every rank builds on
its own device, and runs rank 0's forward from the very message it sent. The ModelRunner under it knows no
ranks: what tensor parallelism changes for it comes as one flag, and it imports nothing from distributed/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import microscale
from microscale import LLM, SamplingParams
from microscale.engine import model_runner
from microscale.engine.model_runner import ModelRunner, StepInputs, step_tensors
from microscale.models.loader import load_model, load_model_config
from microscale.quant.scheme import QuantScheme

PACKAGE = Path(microscale.__file__).parent
BLOCK_SIZE = 4
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8]]


class _RecordingWorkers:
    """Stands in for the other ranks: keeps every step the executor broadcasts to them."""

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
    workers = _RecordingWorkers()
    monkeypatch.setattr(llm.engine.executor, "send", workers.send)
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    finally:
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


@pytest.mark.parametrize("shared_steps", [False, True])
def test_a_runner_whose_steps_other_ranks_share_runs_them_eagerly(tiny_model, shared_steps):
    """Under tensor parallelism (shared_steps, told by whoever builds the runner) rank 0 replays no decode
    graphs: the workers run each broadcast step eagerly."""
    model_dir = tiny_model("llama")
    cfg = load_model_config(model_dir)
    model, _ = load_model(model_dir, cfg, torch.float32, torch.device("cpu"), 64, QuantScheme())
    runner = ModelRunner(model, cfg, torch.device("cpu"), torch.float32, max_num_seqs=2, max_model_len=64,
                         kernel_backend="triton", shared_steps=shared_steps)
    reason = runner.graphs_unavailable_reason()
    assert reason == ("tensor parallel workers run each broadcast step eagerly" if shared_steps else None)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, wherever the import statement sits (type-checking blocks, functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_model_runner_imports_nothing_from_distributed():
    imported = _imports(PACKAGE / "engine" / "model_runner.py")
    assert "microscale.engine.shard" not in imported  # nor from what builds it
    assert not [name for name in imported if name.startswith("microscale.distributed")]


def test_distributed_and_quant_import_nothing_from_the_layers_above_them():
    """distributed/ holds process groups, collectives and launch helpers; quant/ holds format knowledge: the
    worker loop, calibration and the quantize workflow live above them."""
    above = ("microscale.engine", "microscale.models", "microscale.layers", "microscale.attention")
    for folder in ("distributed", "quant"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            assert not [name for name in _imports(path) if name.startswith(above)], path.name
