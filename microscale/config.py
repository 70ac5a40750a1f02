"""Engine configuration: the model's shape (from config.json) and the engine's knobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from microscale.quant.config import CalibConfig

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Map a user dtype ("auto", "bfloat16", torch.float32, ...) to a torch dtype.

    "auto" keeps the checkpoint's dtype, except float16 on CPU, which torch computes slowly: bfloat16 instead.
    """
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        chosen = checkpoint_dtype
        if chosen == torch.float16 and device.type == "cpu":
            chosen = torch.bfloat16
    elif dtype in _DTYPES:
        chosen = _DTYPES[dtype]
    else:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16.")
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"Unsupported dtype {chosen}; choose float32, bfloat16 or float16.")
    return chosen


@dataclass
class RopeConfig:
    """RoPE parameters normalised from either transformers-4 (`rope_theta` + `rope_scaling`) or
    transformers-5 (`rope_parameters`) style config.json."""

    theta: float = 10000.0
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        # As in transformers 5: a rope_scaling entry (transformers-4 style) replaces rope_parameters whole,
        # e.g. when one is added by hand to a config.json that transformers 5 wrote.
        params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if rope_type in ("llama3", "yarn"):
            # A top-level original_max_position_embeddings wins over the one in the dict, as in transformers.
            if cfg.get("original_max_position_embeddings") is not None:
                params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if rope_type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(f"Unsupported rope type {rope_type!r}: microscale supports default, linear, llama3, yarn.")
        return cls(theta=float(theta), rope_type=rope_type, params=params, partial_rotary_factor=float(partial))


@dataclass
class ModelConfig:
    """The architecture facts microscale needs, read from a Hugging Face config.json."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: RopeConfig
    # Per-layer sliding window (None = full attention).
    layer_windows: list[int | None]
    checkpoint_dtype: torch.dtype
    eos_token_ids: list[int]
    hf_config: dict[str, Any]
    # Mixture of experts (0 experts: a dense MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # A learned per-head logit in every attention softmax's denominator (gpt-oss).
    attention_sinks: bool = False
    # quantization_config.quant_method of a pre-quantized checkpoint ("mxfp4" for gpt-oss), else None.
    checkpoint_quant: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build.")
        arch = archs[0]
        model_type = cfg.get("model_type", "")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        n_layers = cfg["num_hidden_layers"]
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases (and none on o_proj) without saying so in config.json.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_proj_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope=RopeConfig.from_hf(cfg),
            layer_windows=_layer_windows(cfg, n_layers),
            checkpoint_dtype=_DTYPES.get(dtype_name, torch.float32),
            eos_token_ids=eos_ids,
            hf_config=cfg,
            num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0,
            attention_sinks=model_type == "gpt_oss",
            checkpoint_quant=(cfg.get("quantization_config") or {}).get("quant_method"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _layer_windows(cfg: dict[str, Any], n_layers: int) -> list[int | None]:
    """Which layers use sliding-window attention, and how wide."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if not window:
        return [None] * n_layers
    if cfg.get("model_type") in ("qwen2", "qwen3"):
        # Qwen: sliding window only when enabled, and only on layers from max_window_layers on.
        if not cfg.get("use_sliding_window", False):
            return [None] * n_layers
        first = cfg.get("max_window_layers", n_layers)
        return [window if i >= first else None for i in range(n_layers)]
    return [window] * n_layers


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")


# ---- speculative decoding (the engine's spec_decode package runs it) ----

SPECULATIVE_METHODS = ("ngram", "draft")
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's n when neither bound is given
# disable_by_batch_size when none is given, by device type and method: above it verifying drafts costs more than it
# saves. CPU, measured on the bundled model (benchmarks/results/spec-decode.md): n-gram 1.2x at 8 running requests,
# 0.9x at 16; the draft model 1.1-1.2x alone, 0.95x at 4. GPU: not measured here (no GPU lent); 32 keeps an 8B-class
# decode step memory-bound, where a verification's extra tokens are nearly free (any accelerator counts as a GPU).
AUTO_DISABLE_BY_BATCH_SIZE = {("cpu", "ngram"): 8, ("cpu", "draft"): 1, ("gpu", "ngram"): 32, ("gpu", "draft"): 32}


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup: propose what followed the last n tokens' latest earlier occurrence in the
    request's own tokens) or "draft" (a smaller model on the same tokenizer, from the folder `model`).
    num_speculative_tokens: k, the most tokens proposed per step. prompt_lookup_min/max: the n-gram sizes tried,
    longest first (one given: both are it; neither: 5, as vLLM). disable_by_batch_size: no speculation while more
    requests than this run, where verifying drafts stops paying for itself (None: the engine picks it for its device
    and method, AUTO_DISABLE_BY_BATCH_SIZE)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {self.method!r}.")
        _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        if self.disable_by_batch_size is not None:
            _positive_int("disable_by_batch_size", self.disable_by_batch_size)
        if self.method == "draft":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model (the draft model's folder) is required for method 'draft'.")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("speculative_config.prompt_lookup_min/max apply to method 'ngram' only.")
            return
        if self.model is not None:
            raise ValueError("speculative_config.model is for method 'draft'; method 'ngram' needs no model.")
        low = self.prompt_lookup_min if self.prompt_lookup_min is not None else self.prompt_lookup_max
        high = self.prompt_lookup_max if self.prompt_lookup_max is not None else self.prompt_lookup_min
        low = DEFAULT_PROMPT_LOOKUP if low is None else low
        high = DEFAULT_PROMPT_LOOKUP if high is None else high
        _positive_int("prompt_lookup_min", low)
        _positive_int("prompt_lookup_max", high)
        if low > high:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({low}) must not exceed prompt_lookup_max ({high}).")
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    def for_device(self, device_type: str) -> SpeculativeConfig:
        """This config with disable_by_batch_size chosen for `device_type` when none was given."""
        if self.disable_by_batch_size is not None:
            return self
        kind = "cpu" if device_type == "cpu" else "gpu"
        return replace(self, disable_by_batch_size=AUTO_DISABLE_BY_BATCH_SIZE[(kind, self.method)])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(d).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {', '.join(known)}.")
        missing = [name for name in ("method", "num_speculative_tokens") if name not in d]
        if missing:
            raise ValueError(f"speculative_config needs {' and '.join(missing)}.")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """From `--speculative-config`'s JSON text."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}.") from None
        return cls.from_dict(d)


def _positive_int(name: str, value: Any) -> None:
    # bool is an int to Python, but `true` for a count is a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}.")


LOAD_FORMATS = ("auto", "safetensors", "dummy")
KERNEL_BACKENDS = ("auto", "torch", "triton")


def _knob(default: Any, help: str, **flag: Any) -> Any:
    """An EngineArgs field with its command-line flag (microscale/engine_flags.py builds them): its `help`, and
    where the derived ones do not fit, its `flags`, `choices`, `metavar` or `group` ("engine" unless set)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineArgs:
    """Everything `LLM(...)` and the CLI accept about the engine (vLLM's names). Each field's metadata is its
    command-line flag: a new field is a flag of every engine command."""

    model: str = field(metadata={"positional": True,
                                 "help": "local Hugging Face model folder, or a hub id (org/name) when online"})
    # A separate tokenizer folder (e.g. for a config-only folder run with load_format="dummy").
    tokenizer: str | None = _knob(None, "tokenizer folder, if not the model's (e.g. with dummy weights)")
    # Replaces the tokenizer's chat template wherever one is applied (chat and Responses endpoints, /tokenize,
    # `microscale chat`, LLM.chat), as vLLM's --chat-template: a file, or the Jinja text itself.
    chat_template: str | None = _knob(
        None, "chat template replacing the tokenizer's: a Jinja file, or the template text itself (vLLM's meaning; "
              "in text, \\n is a newline)", metavar="FILE|TEMPLATE")
    dtype: str = _knob("auto", "auto, float32, bfloat16 or float16 (default: auto)")
    max_num_seqs: int = _knob(256, "most sequences in one step")
    max_num_batched_tokens: int = _knob(2048, "token budget of one step")
    max_model_len: int | None = _knob(None, "context length (default: the model's)")
    block_size: int = _knob(16, "tokens per KV cache block")
    # KV cache size. kv_cache_memory: GiB, exactly (CPU default: 4). Otherwise, on a GPU, sized after a profiled
    # dummy step of max_num_batched_tokens tokens measured the peak activation memory:
    # cache_max_entry_count (LMDeploy's meaning): this fraction of the GPU memory left free after the weights and
    # the profiled peak activations;
    # gpu_memory_utilization (vLLM's meaning; wins when set): this fraction of the GPU's TOTAL memory for the whole
    # engine, the KV cache getting what weights, peak activations and non-torch memory (CUDA, NCCL) leave of it.
    kv_cache_memory: float | None = _knob(None, "KV cache size in GiB (CPU default: 4)")
    cache_max_entry_count: float = _knob(
        0.8, "GPU: KV cache share of the memory left free after the weights and a profiled step's peak activations "
             "(LMDeploy's meaning; default 0.8)")
    gpu_memory_utilization: float | None = _knob(
        None, "GPU: share of the total memory the engine may use in all, the KV cache getting the rest after weights "
              "and peak activations (vLLM's meaning); wins over --cache-max-entry-count")
    enable_prefix_caching: bool = _knob(True, "turn automatic prefix caching off", flags=("--no-prefix-caching",))
    # GiB of host memory (per rank; pinned beside a GPU) that preempted sequences' KV blocks are swapped out to,
    # and copied back from when they resume; capped at what max_num_seqs full sequences take. When it is full,
    # or 0, a preempted sequence is recomputed instead (in 16-bit dtypes its continuation may then differ).
    swap_space: float = _knob(4.0, "host GiB that preempted sequences' KV is swapped to (0: recompute them; default 4)")
    seed: int = _knob(0, "global random seed")
    load_format: str = _knob("auto", "dummy: random weights of the right shapes (for benchmarks)",
                             choices=LOAD_FORMATS)
    device: str | None = _knob(None, "cpu or cuda (default: cuda when available)")
    # CPU threads for the engine's torch work, all tensor-parallel ranks together. None: torch's own default, one
    # per physical core, best when the engine has the machine to itself; on a shared host fewer leave cores to the
    # rest (oversubscribed cores make every step wait on the slowest thread).
    threads: int | None = _knob(
        None, "CPU threads for the engine (all ranks together); default: torch's, one per physical core, best on a "
              "host of its own: set fewer on a shared one so the engine does not compete for busy cores",
        metavar="N")
    # Weight quantization applied at load time (a format of microscale.quant.format's registry: "fp8",
    # "fp8-dynamic", "mxfp4"); a pre-quantized checkpoint keeps its own.
    quantization: str | None = _knob(
        None, "weight quantization at load time (a pre-quantized checkpoint keeps its own format)",
        flags=("--quant",), group="quantization")
    # KV cache storage: None (the model dtype) or a format of microscale.quant.kv_cache's registry ("int8", "fp8").
    kv_cache_quant: str | None = _knob(None, "KV cache storage", group="quantization")
    # Calibration for static scales (FP8 activations, KV cache); see microscale.quant.config.CalibConfig. On the
    # command line: a flag per CalibConfig field, the config built when `set_by` is given.
    calib_config: CalibConfig | None = _knob(None, "calibration for static scales", group="quantization",
                                             set_by="calib_dataset")
    # Kernels for attention, KV cache writes, norms and activations: "auto" (Triton on a GPU, else the torch
    # reference), "torch", or "triton" (on a CPU only under TRITON_INTERPRET=1, for tests).
    kernel_backend: str = _knob("auto", "kernels for attention, norms, activations (default auto: Triton on a GPU, "
                                        "else torch)", choices=KERNEL_BACKENDS)
    # Decode steps replay CUDA graphs captured at start-up (Triton kernels on a GPU); True: always eager.
    enforce_eager: bool = _knob(False, "no CUDA graphs for decode steps")
    # Batch-invariant mode (SGLang's --enable-deterministic-inference, vLLM's batch invariance): a request's
    # logits do not depend on what else is in the step, on chunk boundaries or on preemption. CPU only; slower
    # (padded matmuls, blockwise attention); the torch kernels.
    deterministic: bool = _knob(False, "batch-invariant mode: a request's output does not depend on what else is "
                                       "batched with it (CPU; slower)")
    # Ranks the model is split over (one process each: a GPU each, or a share of the CPU's cores).
    tensor_parallel_size: int = _knob(
        1, "split the model over N ranks (GPUs, or shares of the CPU); under torchrun, its world size",
        flags=("--tp", "--tensor-parallel-size"), metavar="N")
    # MoE under tensor parallelism: whole experts per rank (experts / N each) instead of every expert split.
    enable_expert_parallel: bool = _knob(
        False, "with --tp: place whole MoE experts on ranks instead of splitting each one")
    # Speculative decoding (vLLM's speculative_config): a SpeculativeConfig, or its dict / JSON text.
    speculative_config: dict[str, Any] | SpeculativeConfig | None = _knob(
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
              '"prompt_lookup_max": 4} (vLLM\'s names)', metavar="JSON")

    # Structured outputs: a grammar (JSON schema, regex, ...) that does not compile within this many ms is the
    # request's error (a 400), never a stalled engine; llguidance's lexer fuel is capped to match.
    structured_outputs_max_compile_ms: float = _knob(
        1000.0, "a structured-outputs grammar that takes longer to compile is the request's error (default 1000)",
        metavar="MS")

    def __post_init__(self) -> None:
        # Fail early, naming the knob, on cache settings the engine cannot use (block_size=0 would divide by 0).
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}.")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive GiB, got {self.kv_cache_memory}.")
        if not self.structured_outputs_max_compile_ms > 0:
            raise ValueError(f"structured_outputs_max_compile_ms must be positive, got "
                             f"{self.structured_outputs_max_compile_ms}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}.")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be auto, torch or triton, got {self.kernel_backend!r}.")
        if self.deterministic and self.kernel_backend == "triton":
            raise ValueError("deterministic=True runs the batch-invariant torch kernels: kernel_backend='triton' "
                             "cannot be combined with it.")
        if not 0 < self.cache_max_entry_count <= 1:
            raise ValueError(f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}.")
        if isinstance(self.speculative_config, str):
            self.speculative_config = SpeculativeConfig.from_json(self.speculative_config)
        elif isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.speculative_config is not None and self.speculative_config.method == "draft" and \
                self.tensor_parallel_size > 1:
            raise ValueError("speculative_config: method 'draft' runs the draft model on rank 0 alone and is not "
                             "supported with tensor_parallel_size > 1 yet; use method 'ngram'.")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
