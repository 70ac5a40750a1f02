"""Quantized models through the Triton GEMMs and the fused MoE kernel (interpreted on CPU) against the torch
reference path: MXFP4 dense Llama (W4A16 GEMM), FP8 Llama (FP8 GEMM), gpt-oss with MXFP4 and 16-bit experts
(fused MoE), and decode steps of an MoE model replayed through the CUDA-graph buffers."""

from __future__ import annotations

import pytest

from microscale import LLM, CalibConfig, SamplingParams
from microscale.engine.cuda_graphs import EagerReplay
from microscale.layers.moe import FusedMoE

KNOBS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, kv_cache_memory=0.01)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8], [61, 70, 71, 72, 90, 91, 5, 17, 99, 3, 250, 42]]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize(("arch", "quantization", "kernel"), [
    ("llama", "mxfp4", "mxfp4_matmul"),
    ("llama", "fp8-dynamic", "fp8_matmul"),
    ("gpt_oss", "mxfp4", None),
    ("gpt_oss", None, None),
])
def test_quantized_triton_path_matches_torch(tiny_model, arch, quantization, kernel):
    model = str(tiny_model(arch))
    reference = LLM(model, kernel_backend="torch", quantization=quantization, **KNOBS)
    triton = LLM(model, kernel_backend="triton", quantization=quantization, **KNOBS)
    layers = list(triton.engine.runner.model.modules())
    if kernel is not None:  # every quantized Linear picked the Triton GEMM
        picked = {getattr(m, kernel).__name__ for m in layers if hasattr(m, kernel)}
        assert picked == {"_triton_matmul"}
    if arch == "gpt_oss":
        assert all(m.fused for m in layers if isinstance(m, FusedMoE))
    ids = PROMPTS[2] * 3
    diff = (reference.engine.prompt_logits(ids) - triton.engine.prompt_logits(ids)).abs().max()
    assert diff < 1e-3, diff  # same weights, same math: summation order only
    assert _tokens(triton) == _tokens(reference)


def test_moe_decode_steps_replay_through_graph_buffers(tiny_model):
    model = str(tiny_model("gpt_oss"))
    reference = LLM(model, kernel_backend="torch", quantization="mxfp4", **KNOBS)
    triton = LLM(model, kernel_backend="triton", quantization="mxfp4", **KNOBS)
    assert triton.engine.runner.graphs_unavailable_reason() is None  # the fused MoE needs no host sync
    triton.engine.runner.enable_decode_graphs(EagerReplay)
    assert _tokens(triton) == _tokens(reference)


def test_fp8_static_llama_fuses_swiglu_with_the_quantisation(tiny_model, tmp_path, monkeypatch):
    """FP8 with calibrated static scales: the Triton SwiGLU emits FP8 for the down projection, and the fused
    add + RMSNorm for q/k/v and gate/up, each in one pass."""
    from microscale.kernels import activation, norm

    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    calib = CalibConfig(calib_dataset=str(text), calib_batches=2, calib_max_seq_length=64)
    model = str(tiny_model("llama"))
    reference = LLM(model, kernel_backend="torch", quantization="fp8", calib_config=calib, **KNOBS)
    fused_calls = []
    original = activation.silu_and_mul
    monkeypatch.setattr(activation, "silu_and_mul", lambda x, fp8_scale=None: (
        fused_calls.append(fp8_scale is not None), original(x, fp8_scale))[1])
    norm_calls = []
    original_norm = norm.rms_norm
    monkeypatch.setattr(norm, "rms_norm", lambda *args: (norm_calls.append(args[5] is not None),
                                                         original_norm(*args))[1])
    triton = LLM(model, kernel_backend="triton", quantization="fp8", calib_config=calib, **KNOBS)
    assert fused_calls and not any(fused_calls)  # calibrating: 16-bit activations, no scale yet
    fused_calls.clear()
    norm_calls.clear()
    assert _tokens(triton) == _tokens(reference)
    assert fused_calls and all(fused_calls)
    # Per forward: each layer's input and post-attention norms emit FP8; the final norm feeds the 16-bit LM head.
    layers = triton.engine.model_config.num_hidden_layers
    assert norm_calls.count(True) == 2 * layers * norm_calls.count(False) > 0
