"""MXFP4 in whole models: the checkpoint `microscale quantize` writes (transformers loads it with its own
mxfp4 dequantisation and agrees with microscale), the memory the packed experts take, and `--quant mxfp4` at
load time on gpt-oss and Llama models (exactly transformers on the same weights rounded through MXFP4)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, TOKENIZER_FILES
from hf_reference import ATOL, hf_logits, max_diff, prompt_logits, small_llm

from microscale.cli import main
from microscale.export import quantize_checkpoint
from microscale.layers.moe import FusedMoE
from microscale.quant.mxfp4 import pack_mxfp4, unpack_mxfp4

transformers = pytest.importorskip("transformers")

TRAINED = REPO / "models" / "tiny-gptoss-pycode"
TEXT = (REPO / "data" / "pycode-valid.txt").read_text()[:600]


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gptoss") / "mxfp4"
    assert main_exit(["quantize", str(TRAINED), "--quant", "mxfp4", "--out", str(out)]) == 0
    return out


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    return exc.value.code or 0


def hf_mxfp4_model(path: Path, dtype: torch.dtype):
    """transformers' own MXFP4 loading path (dequantised, as it does on a CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=transformers.Mxfp4Config(dequantize=True)
        )
    return model.eval()


def test_checkpoint_layout(mxfp4_checkpoint) -> None:
    from safetensors import safe_open

    config = json.loads((mxfp4_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    with safe_open(str(mxfp4_checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        blocks = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
        scales = f.get_tensor("model.layers.0.mlp.experts.down_proj_scales")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in names  # biases stay 16-bit
    # 8 experts, 2 x 256 interleaved gate/up rows, hidden 256 = 8 blocks of 32 values in 16 bytes.
    assert blocks.dtype == torch.uint8 and blocks.shape == (8, 512, 8, 16)
    assert scales.dtype == torch.uint8 and scales.shape == (8, 256, 8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_and_microscale_agree_on_the_checkpoint(mxfp4_checkpoint, dtype) -> None:
    """float32: both dequantise exactly, so the logits agree like any float32 parity (1e-4). bfloat16: measured
    against transformers' float32 logits, microscale's bf16 error is at most twice transformers' own (the
    scale-free check of test_hf_parity.test_bfloat16_close_to_transformers), and the top-1 token is the same
    almost everywhere (bf16 logits tie often). Not a bound on the distance between the two bf16 runs: the model
    routes each token to 2 of 8 experts, and where a rounding difference flips a choice the logits move by
    ~1.5. transformers rounds the attention probabilities to bf16 (microscale's torch path does too and agrees
    closely); attention computed exactly, as by the AMX prefill kernel, flips a few other tokens."""
    llm = small_llm(mxfp4_checkpoint, dtype=dtype)
    ids = llm.get_tokenizer().encode(TEXT)
    ours = prompt_logits(llm, ids)
    expected = hf_logits(hf_mxfp4_model(mxfp4_checkpoint, getattr(torch, dtype)), ids)
    if dtype == "float32":
        assert max_diff(ours, expected) < ATOL
    else:
        reference = hf_logits(hf_mxfp4_model(mxfp4_checkpoint, torch.float32), ids)
        assert max_diff(ours, reference) < 2 * max_diff(expected, reference)
        assert (ours.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.95
    # MXFP4 changed the model (the comparison is not of two 16-bit models) ...
    original = prompt_logits(small_llm(TRAINED, dtype=dtype), ids)
    assert max_diff(ours, original) > 0.05
    # ... but not its predictions, mostly.
    assert (ours.argmax(-1) == original.argmax(-1)).float().mean().item() >= 0.8


def expert_bytes(llm) -> tuple[int, int]:
    """(resident bytes of the experts' weight storage, bytes the same weights take in bf16)."""
    resident = bf16 = 0
    for layer in llm.engine.runner.model.modules():
        if isinstance(layer, FusedMoE):
            for name in ("w13", "w2"):
                blocks, scales = getattr(layer, f"{name}_blocks"), getattr(layer, f"{name}_scales")
                resident += blocks.numel() * blocks.element_size() + scales.numel() * scales.element_size()
                bf16 += 2 * scales.numel() * 32
    return resident, bf16


def test_experts_stay_packed_in_memory(mxfp4_checkpoint) -> None:
    llm = small_llm(mxfp4_checkpoint, dtype="bfloat16")
    names = [n for n, _ in llm.engine.runner.model.named_parameters()]
    assert not [n for n in names if n.endswith(("experts.w13", "experts.w2"))], "16-bit experts resident"
    resident, bf16 = expert_bytes(llm)
    assert resident / bf16 == pytest.approx(4.25 / 16)  # 4 bits + an 8-bit scale per 32 values
    assert resident / bf16 <= 0.3


def test_online_mxfp4_experts_equal_the_checkpoints(mxfp4_checkpoint) -> None:
    """quantization="mxfp4" on the bf16 checkpoint packs the experts exactly as `microscale quantize` does."""
    online = small_llm(TRAINED, quantization="mxfp4").engine.runner.model.state_dict()
    stored = small_llm(mxfp4_checkpoint).engine.runner.model.state_dict()
    packed = [n for n in stored if n.endswith(("_blocks", "_scales"))]
    assert len(packed) == 4 * 4  # 4 layers x (w13, w2) x (blocks, scales)
    for name in packed:
        assert torch.equal(online[name], stored[name]), name
    # Online, the attention projections are MXFP4 too; the router stays 16-bit.
    assert "model.layers.0.self_attn.qkv_proj.weight_blocks" in online
    assert online["model.layers.0.mlp.router.weight"].dtype == torch.float32


def _fake_quantize(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The weight rounded through MXFP4 along its input dim, back in its dtype."""
    moved = weight.transpose(input_dim, -1)
    return unpack_mxfp4(*pack_mxfp4(moved), dtype=weight.dtype).transpose(input_dim, -1)


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_load_time_mxfp4_matches_transformers_on_rounded_weights(arch, parity_model, tmp_path) -> None:
    """The reference: transformers on a copy of the checkpoint whose Linear and expert weights were rounded
    through MXFP4 (our pack/unpack, checked against the spec and transformers in test_mxfp4.py)."""
    src = parity_model(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight") and "router" not in name:
                param.copy_(_fake_quantize(param, 1))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.copy_(_fake_quantize(param, 1))  # [experts, in, out]
    model.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp_path / name)
    ids = list(range(7, 47))
    ours = prompt_logits(small_llm(src, quantization="mxfp4"), ids)
    assert max_diff(ours, hf_logits(model.eval(), ids)) < ATOL
    assert max_diff(ours, prompt_logits(small_llm(src), ids)) > 1e-3  # the rounding did change the model


def test_quantize_refuses_what_it_cannot_write(tmp_path, mxfp4_checkpoint, capsys) -> None:
    llama = REPO / "models" / "tiny-llama-pycode"
    with pytest.raises(ValueError, match="dense model"):
        quantize_checkpoint(llama, tmp_path / "a")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(mxfp4_checkpoint, tmp_path / "b")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        quantize_checkpoint(TRAINED, mxfp4_checkpoint)
    assert main_exit(["quantize", str(llama), "--quant", "mxfp4", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
