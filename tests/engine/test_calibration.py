"""Calibration takes a model and a scoring callable, no engine: it records what the model sees while the
callable runs each window through it, then fixes every static FP8 layer's input scale and returns the largest
|k| and |v| of each attention layer (the KV cache's scales come from them)."""

from __future__ import annotations

import pytest
import torch

from microscale.engine.calibration import calibrate
from microscale.engine.model_runner import ModelRunner, StepInputs
from microscale.models.loader import load_model, load_model_config
from microscale.quant.fp8 import Fp8StaticMethod, fp8_scale
from microscale.quant.scheme import QuantScheme

CPU = torch.device("cpu")
BLOCK = 4
WINDOWS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8], list(range(20, 44))]


@pytest.fixture
def fp8_runner(tiny_model) -> ModelRunner:
    """The tiny Llama with FP8 weights and static activation scales still to measure, on a small KV cache."""
    model_dir = tiny_model("llama")
    cfg = load_model_config(model_dir)
    model, _ = load_model(model_dir, cfg, torch.float32, CPU, 64, QuantScheme.resolve("fp8", None))
    runner = ModelRunner(model, cfg, CPU, torch.float32, max_num_seqs=1, max_model_len=64)
    runner.allocate_kv_cache(num_blocks=16, block_size=BLOCK)
    return runner


def _scorer(runner: ModelRunner, seen: list[list[int]]):
    """Runs a token sequence through the runner as one prefill in blocks 0, 1, ..., keeping what it was given."""

    def score(ids: list[int]) -> torch.Tensor:
        seen.append(list(ids))
        table = list(range(-(-len(ids) // BLOCK)))
        step = StepInputs(input_ids=ids, positions=list(range(len(ids))), slots=list(range(len(ids))),
                          num_decodes=0, decode_seq_ids=[], decode_tables=[], prefills=[(len(ids), 0, table)],
                          rows=None)
        return runner.forward_logits(step)

    return score


def _static_fp8_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), Fp8StaticMethod)]


def test_calibration_sets_each_input_scale_from_the_largest_input_the_callable_made_it_see(fp8_runner):
    model, seen = fp8_runner.model, []
    score = _scorer(fp8_runner, seen)
    with pytest.raises(RuntimeError, match="need an input scale"):  # static FP8 cannot run uncalibrated
        score(WINDOWS[0])
    seen.clear()
    layers = _static_fp8_layers(model)
    largest = {layer: torch.zeros(()) for layer in layers}

    def watch(layer, args):
        largest[layer] = torch.maximum(largest[layer], args[0].detach().abs().amax().float())

    hooks = [layer.register_forward_pre_hook(watch) for layer in layers]
    kv_amax = calibrate(model, score, WINDOWS)
    for hook in hooks:
        hook.remove()

    assert seen == WINDOWS  # every window, once, in order
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
    for layer in layers:
        assert torch.equal(layer.input_scale, torch.full_like(layer.input_scale, fp8_scale(largest[layer]).item()))
    assert sorted(kv_amax) == [0, 1]
    for k_amax, v_amax in kv_amax.values():
        assert k_amax.shape == v_amax.shape == (2,)  # per KV head
        assert (k_amax > 0).all() and (v_amax > 0).all()
    assert torch.isfinite(score(WINDOWS[0])).all()  # the layers now serve with their scales
