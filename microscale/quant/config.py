"""The user-facing quantization API, with TensorRT-LLM's names: QuantAlgo, QuantConfig, CalibConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class QuantAlgo(str, Enum):
    """What to quantize and how. Values are microscale's scheme names (also the CLI's)."""

    NO_QUANT = "none"
    FP8 = "fp8"  # E4M3 weights (per-tensor scale) and activations (static per-tensor scale from calibration)
    FP8_PER_CHANNEL_PER_TOKEN = "fp8-dynamic"  # per-channel weight scales, dynamic per-token activation scales
    MXFP4 = "mxfp4"  # weight-only W4A16, OCP MX blocks of 32
    W4A16_MXFP4 = "mxfp4"  # alias of MXFP4
    INT8 = "int8"  # KV cache only
    INT4 = "int4"  # KV cache only: asymmetric 4-bit per token and KV head (LMDeploy's quant_policy=4)


_WEIGHT_ALGOS = (QuantAlgo.NO_QUANT, QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.MXFP4)
_KV_ALGOS = (QuantAlgo.FP8, QuantAlgo.INT8, QuantAlgo.INT4)


@dataclass
class QuantConfig:
    """`quant_algo` for the Linear layers (and MoE experts); `kv_cache_quant_algo` for the KV cache. Either may
    be None."""

    quant_algo: QuantAlgo | str | None = None
    kv_cache_quant_algo: QuantAlgo | str | None = None

    def __post_init__(self) -> None:
        self.quant_algo = _parse(self.quant_algo, _WEIGHT_ALGOS, "quant_algo")
        self.kv_cache_quant_algo = _parse(self.kv_cache_quant_algo, _KV_ALGOS, "kv_cache_quant_algo")

    @property
    def quantization(self) -> str | None:
        """The scheme name EngineArgs.quantization takes."""
        return None if self.quant_algo in (None, QuantAlgo.NO_QUANT) else self.quant_algo.value

    @property
    def kv_cache_quant(self) -> str | None:
        return None if self.kv_cache_quant_algo is None else self.kv_cache_quant_algo.value


def _parse(value: QuantAlgo | str | None, allowed: tuple[QuantAlgo, ...], what: str) -> QuantAlgo | None:
    if value is None:
        return None
    try:
        algo = QuantAlgo(value) if not isinstance(value, QuantAlgo) else value
    except ValueError:
        algo = QuantAlgo.__members__.get(str(value).upper())
    if algo not in allowed:
        names = ", ".join(sorted({a.name for a in allowed}))
        raise ValueError(f"{what}={value!r} is not supported; choose one of {names}.")
    return algo


@dataclass
class CalibConfig:
    """Calibration for static scales: `calib_batches` x `calib_batch_size` sequences of up to
    `calib_max_seq_length` tokens, drawn (seeded) from `calib_dataset`: a text file, or JSONL whose lines are
    strings or objects with a "text" field. `tokenizer_max_seq_length` caps how many tokens of each document
    are used."""

    # The metadata are the command-line flags (microscale/engine_flags.py).
    calib_dataset: str | None = field(default=None, metadata={
        "help": "text or JSONL to calibrate static scales on (needed by --quant fp8)", "flags": ("--calib-data",),
        "metavar": "FILE"})
    calib_batches: int = field(default=64, metadata={"help": "calibration batches (default 64)"})
    calib_batch_size: int = field(default=1, metadata={"help": "sequences per calibration batch (default 1)"})
    calib_max_seq_length: int = field(default=512, metadata={"help": "tokens per calibration sequence (default 512)"})
    tokenizer_max_seq_length: int = field(default=1024, metadata={
        "not_cli": "how much of each document is read rarely matters once calib_max_seq_length caps the sequences"})
    random_seed: int = field(default=1234, metadata={
        "not_cli": "the fixed draw keeps calibrated scales reproducible from the data file alone"})

    def __post_init__(self) -> None:
        for name in ("calib_batches", "calib_batch_size", "calib_max_seq_length", "tokenizer_max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibConfig.{name} must be at least 1, got {getattr(self, name)}.")
