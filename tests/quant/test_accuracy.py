"""Accuracy is part of the product: each scheme on the really trained tiny-llama-pycode, scored on a 60k-
character slice of held-out Python (data/pycode-valid.txt) against the unquantized model. Bounds from the
issues (plain fake-quantization studies measured +0.14%, +0.00%, +0.06%, +0.30%, and about +0.3% for the INT4 KV
cache); KL and top-1 agreement are printed (pytest -s) and sanity-checked."""

from __future__ import annotations

import pytest
from conftest import BUNDLED_MODEL, REPO

from microscale import LLM, CalibConfig, QuantAlgo, QuantConfig
from microscale.eval.compare import compare_windows
from microscale.eval.perplexity import window_logits

TEXT = (REPO / "data" / "pycode-valid.txt").read_text()
EVAL = TEXT[:60_000]
CONTEXT = 512  # consecutive windows (stride = context): half the work of a sliding window, same comparison

# scheme -> (QuantConfig, calibrate?, perplexity bound in %)
SCHEMES = {
    "fp8-static-w8a8": (QuantConfig(quant_algo=QuantAlgo.FP8), True, 0.5),
    "fp8-dynamic": (QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN), False, 0.5),
    "int8-kv": (QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8), False, 0.5),
    "int4-kv": (QuantConfig(kv_cache_quant_algo=QuantAlgo.INT4), False, 1.0),
    "fp8-kv": (QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8), False, 0.5),
    "fp8-kv-calibrated": (QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8), True, 0.5),
    "mxfp4-w4a16": (QuantConfig(quant_algo=QuantAlgo.MXFP4), False, 1.5),
}


def _llm(**kwargs) -> LLM:
    return LLM(str(BUNDLED_MODEL), dtype="float32", max_model_len=CONTEXT, max_num_batched_tokens=CONTEXT, **kwargs)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return _llm().get_tokenizer().encode(EVAL, add_special_tokens=False)


@pytest.fixture(scope="module")
def reference(ids) -> list:
    """The unquantized model's windows, computed once for every scheme."""
    return list(window_logits(_llm().engine, ids, CONTEXT, CONTEXT))


@pytest.fixture(scope="module")
def calib_config(tmp_path_factory) -> CalibConfig:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT[-120_000:])  # disjoint from the scored slice
    return CalibConfig(calib_dataset=str(path), calib_batches=16, calib_max_seq_length=CONTEXT)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_stays_within_its_perplexity_bound(scheme, ids, reference, calib_config) -> None:
    quant_config, calibrated, bound = SCHEMES[scheme]
    quantized = _llm(quant_config=quant_config, calib_config=calib_config if calibrated else None)
    result = compare_windows(reference, window_logits(quantized.engine, ids, CONTEXT, CONTEXT))
    print(f"{scheme}: ppl {result.ppl_ref:.3f} -> {result.ppl_quant:.3f} ({result.ppl_delta_pct:+.3f}%), "
          f"KL {result.kl_mean:.2e}, top-1 agreement {result.top1_agreement:.4f} over {result.tokens} tokens")
    assert result.tokens > 15_000
    assert result.ppl_delta_pct < bound
    assert 0 < result.kl_mean < 0.05  # quantization changed something, and not much
    assert result.top1_agreement > 0.9
