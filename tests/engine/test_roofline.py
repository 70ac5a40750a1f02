"""Roofline accounting against bytes and FLOPs computed by hand from the shapes: a small Llama (decode-only, FP8
weights), a GQA Qwen3 (prefill-only, int8 KV) and a gpt-oss MoE (mixed, MXFP4 experts, FP8 KV, a sliding
window). Models are built on the meta device (shapes only)."""

from __future__ import annotations

import os

import pytest
import torch

from microscale.config import ModelConfig
from microscale.engine.device_peaks import DevicePeaks, busy_reason, datasheet_for, device_peaks
from microscale.engine.plan import build_meta_model
from microscale.engine.roofline import RooflineModel, StepRoofline, attended_keys
from microscale.quant.kv_cache import make_kv_cache
from microscale.quant.scheme import QuantScheme

H, INTER, VOCAB, HD = 64, 128, 256, 16  # hidden, intermediate, vocabulary, head_dim


def config(model_type: str, kv_heads: int, **extra) -> ModelConfig:
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}[model_type]
    return ModelConfig.from_dict({
        "architectures": [arch], "model_type": model_type, "vocab_size": VOCAB, "hidden_size": H,
        "intermediate_size": INTER, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
        "head_dim": HD, "max_position_embeddings": 128, "torch_dtype": "bfloat16", **extra})


def roofline(cfg: ModelConfig, quant: str | None, kv: str | None) -> RooflineModel:
    scheme = QuantScheme.resolve(quant, cfg.hf_config.get("quantization_config"))
    model = build_meta_model(cfg, torch.bfloat16, scheme, 128, 1, False)
    kv_bytes = [make_kv_cache(kv, cfg.num_key_value_heads, HD, torch.bfloat16, torch.device("meta")).bytes_per_token()
                for _ in range(cfg.num_hidden_layers)]
    return RooflineModel.of(model, cfg, torch.bfloat16, kv_bytes)


def test_attended_keys_causal_and_windowed():
    assert attended_keys(0, 4, None) == 1 + 2 + 3 + 4
    assert attended_keys(10, 1, None) == 11
    assert attended_keys(0, 6, 4) == 1 + 2 + 3 + 4 + 4 + 4
    assert attended_keys(30, 2, 4) == 8
    assert attended_keys(2, 3, 4) == 3 + 4 + 4


def test_llama_decode_only_with_fp8_weights():
    rf = roofline(config("llama", 4), "fp8", None)
    # Per layer: qkv [192, 64], o [64, 64], gate_up [256, 64], down [64, 128] in FP8 (1 byte), each with a float32
    # weight scale and input scale per shard (3, 1, 2, 1 shards); two bf16 norms of 64. Final norm, bf16 LM head.
    layer = (192 * 64 + 64 * 64 + 256 * 64 + 64 * 128) + 4 * 2 * (3 + 1 + 2 + 1) + 2 * 64 * 2
    dense = 2 * layer + 64 * 2 + VOCAB * H * 2
    cost = rf.step_cost([(1, 10), (1, 20)], sampled_rows=2)
    assert cost.decode_only and cost.tokens == 2
    assert cost.weight_bytes == dense + 2 * H * 2  # plus the two tokens' embedding rows
    kv_token = 2 * 4 * HD * 2  # K and V, 4 heads, bf16, per layer
    assert cost.kv_read_bytes == 2 * (11 + 21) * kv_token
    assert cost.kv_write_bytes == 2 * 2 * kv_token
    matmul = 2 * (192 * 64 + 64 * 64 + 256 * 64 + 64 * 128)  # weights a token passes through, both layers
    attention = 2 * (11 + 21) * 4 * 4 * HD
    assert cost.flops == 2 * 2 * matmul + 2 * 2 * VOCAB * H + attention


def test_qwen3_gqa_prefill_only_with_int8_kv():
    rf = roofline(config("qwen3", 2), None, "int8")
    cost = rf.step_cost([(8, 0)], sampled_rows=1)
    assert not cost.decode_only
    kv_token = 2 * 2 * HD * 1 + 2 * 2 * 2  # int8 K and V of 2 heads, a bf16 scale per token and head
    assert cost.kv_read_bytes == 2 * 8 * kv_token
    assert cost.kv_write_bytes == 2 * 8 * kv_token
    # q/k norms of 16 in every layer count as weights; qkv is [64 + 2 * 32, 64].
    layer = (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128) * 2 + (2 * 64 + 2 * HD) * 2
    assert cost.weight_bytes == 2 * layer + 64 * 2 + VOCAB * H * 2 + 8 * H * 2
    matmul = 2 * (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128)
    assert cost.flops == 2 * 8 * matmul + 2 * VOCAB * H + 2 * 36 * 4 * 4 * HD


def test_gpt_oss_mixed_step_with_mxfp4_experts_and_fp8_kv():
    cfg = config("gpt_oss", 2, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"], attention_bias=True,
                 quantization_config={"quant_method": "mxfp4"})
    rf = roofline(cfg, None, "fp8")
    cost = rf.step_cost([(1, 30), (6, 0)], sampled_rows=2)
    # One expert: w13 [256, 64] and w2 [64, 128] in MXFP4 (17 bytes per 32 values), bf16 biases of 256 and 64.
    expert = (256 * 64 + 64 * 128) // 32 * 17 + (256 + 64) * 2
    distinct = 4 * (1 - (1 - 2 / 4) ** 7)  # expected distinct experts of 7 tokens picking 2 of 4
    # Dense: qkv [128, 64] + bias, o [64, 64] + bias, float32 sinks of 4 heads, router [4, 64] + bias, float32
    # norms (gpt-oss), bf16 LM head.
    layer = (128 * 64 + 128 + 64 * 64 + 64 + 4 * 64 + 4) * 2 + 4 * 4 + 2 * 64 * 4
    dense = 2 * layer + 64 * 4 + VOCAB * H * 2
    assert cost.weight_bytes == pytest.approx(dense + 7 * H * 2 + 2 * distinct * expert)
    kv_token = 2 * 2 * HD * 1  # fp8, per-tensor scales
    # Sliding layer (window 4): the decode at 30 reads 4 keys, the prefill 0..5 its 6; the full layer 31 and 6.
    assert cost.kv_read_bytes == (4 + 6 + 31 + 6) * kv_token
    assert cost.kv_write_bytes == 2 * 7 * kv_token
    pairs = (4 + (1 + 2 + 3 + 4 + 4 + 4)) + (31 + 21)
    matmul = 2 * (128 * 64 + 64 * 64 + 64 * 4)  # attention projections and the router, both layers
    experts = 2 * 7 * 2 * 2 * (3 * 64 * 128)  # tokens x layers x k x an expert's weights (gate, up, down)
    assert cost.flops == 2 * 7 * matmul + experts + 2 * 2 * VOCAB * H + pairs * 4 * 4 * HD


def test_speed_of_light_is_the_larger_share_of_peak():
    cost = roofline(config("llama", 4), None, None).step_cost([(1, 10)], 1)
    peaks = DevicePeaks("test", bytes_per_s=cost.bytes * 10, flops_per_s=cost.flops * 100)
    step = StepRoofline(cost, 0.05, peaks)  # 20x the bytes and FLOPs per second of one step per second
    assert step.bandwidth_fraction == pytest.approx(2.0) and step.compute_fraction == pytest.approx(0.2)
    assert step.speed_of_light == step.bandwidth_fraction


def test_peaks_are_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))
    measured = []

    def fake(device):
        measured.append(device)
        return DevicePeaks("x", 1e12, 2e12)

    first = device_peaks(torch.device("cpu"), fake)
    second = device_peaks(torch.device("cpu"), fake)
    assert len(measured) == 1 and (second.bytes_per_s, second.flops_per_s) == (first.bytes_per_s, 2e12)


def test_a_cpu_measured_while_busy_is_measured_again_next_time(tmp_path, monkeypatch):
    """A figure taken while other processes held the cores (the CPU's copy read 4.4 GB/s, a seventh of the
    truth, and the bench printed 273% of peak) is used once, not cached."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr("os.getloadavg", lambda: (cores + 1.5, 1.0, 1.0))
    assert "busy" in busy_reason(torch.device("cpu")) and busy_reason(torch.device("cuda")) is None
    figures = iter([DevicePeaks("x", 4e9, 1e12), DevicePeaks("x", 3e10, 1e12)])
    assert device_peaks(torch.device("cpu"), lambda device: next(figures)).bytes_per_s == 4e9
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 1.0, 1.0))
    assert device_peaks(torch.device("cpu"), lambda device: next(figures)).bytes_per_s == 3e10
    assert device_peaks(torch.device("cpu"), lambda device: DevicePeaks("x", 1.0, 1.0)).bytes_per_s == 3e10


def test_datasheet_names():
    assert datasheet_for("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert datasheet_for("NVIDIA L40S")[0] == "L40S" and datasheet_for("NVIDIA L4")[0] == "L4"
    assert datasheet_for("NVIDIA A100-SXM4-80GB")[0] == "A100" and datasheet_for("Tesla T4") is None
