"""The `microscale bench throughput` settings: a YAML file in the seed's shape (engine + data sections), with
command-line flags of the same names overriding it. Unknown keys and wrong types fail naming the key. The engine
section also takes LMDeploy's and vLLM's names (`backend: turbomind`, `quant_policy: 4`, `session_len`,
`kv_cache_dtype`: microscale.peer_names)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from microscale.config import SpeculativeConfig
from microscale.peer_names import BENCH, bench_peer_keys, peer_names, translate

BACKENDS = ("microscale", "transformers", "vllm")


class BenchConfigError(ValueError):
    """A setting the benchmark cannot use; the message names the key."""


@dataclass
class EngineSection:
    model_path: str = "models/tiny-llama-pycode"
    backend: str = "microscale"  # or "transformers" (the baseline), "vllm" (if importable or vllm_python is set)
    max_batch_size: int = 32  # concurrent sequences (microscale, vLLM); the padded batch size (transformers)
    # GPU, microscale only: the KV cache's share of the memory left free after the weights and a profiled step's
    # peak activations (LMDeploy's meaning; vLLM has no such knob and then runs with its own default).
    cache_max_entry_count: float = 0.8
    # GPU: the share of the total memory each engine may use in all (vLLM's meaning). Set, it goes to microscale
    # (where it wins over cache_max_entry_count) and to vLLM alike.
    gpu_memory_utilization: float | None = None
    kv_cache_memory: float | None = None  # CPU: KV cache GiB (default: the engine's)
    quant: str = "none"  # none | fp8 | fp8-dynamic | mxfp4
    kv_cache_quant: str = "none"  # none | int8 | int4 | fp8
    dtype: str = "auto"
    load_format: str = "auto"  # dummy: random weights (a folder with only config.json + --tokenizer)
    tokenizer: str | None = None  # tokenizer folder, if not the model's
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the longest prompt + output of the workload
    device: str | None = None
    kernel_backend: str = "auto"  # microscale: auto | torch | triton
    enforce_eager: bool = False  # microscale: no CUDA graphs for decode steps
    tensor_parallel_size: int = 1  # microscale: ranks the model is split over
    enable_expert_parallel: bool = False  # microscale, with tensor_parallel_size > 1: whole MoE experts per rank
    # microscale: speculative decoding as JSON in vLLM's names, e.g. {"method": "ngram", "num_speculative_tokens": 4}
    speculative_config: str | None = None
    vllm_python: str | None = None  # the python of a virtualenv with vLLM, when it is not importable here


@dataclass
class DataSection:
    dataset_path: str = "random"  # "random", a ShareGPT JSON file, or a plain text file
    input_len: int = 512
    output_len: int = 256
    num_prompts: int = 200
    seed: int = 0
    range_ratio: float = 0.0  # random/text: lengths uniform in len * [1 - r, 1 + r]
    sharegpt_output_len: int | None = None  # ShareGPT: fix every output length (default: the reply's)


@dataclass
class BenchConfig:
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataSection = field(default_factory=DataSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"engine": EngineSection, "data": DataSection}


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> BenchConfig:
    """Read the YAML (if any), then apply `overrides` ({section: {key: value}}, e.g. from flags), then check."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BenchConfigError(f"bench config {path} not found.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise BenchConfigError(f"bench config {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise BenchConfigError(f"bench config {path} must be a mapping with 'engine' and 'data' sections.")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise BenchConfigError(f"unknown section {sorted(unknown)[0]!r} in the bench config; known: engine, data.")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise BenchConfigError(f"'{name}' must be a mapping of settings, got {type(values).__name__}.")
        values = {**values, **{k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None}}
        if name == "engine":
            values = _translate_peer_names(values)
        sections[name] = _build_section(name, cls, values)
    config = BenchConfig(**sections)
    _check_values(config)
    return config


def _translate_peer_names(values: dict[str, Any]) -> dict[str, Any]:
    """The engine section with LMDeploy's and vLLM's keys (and values) in microscale's."""
    native = {f.name for f in fields(EngineSection)}
    peer = bench_peer_keys(values, native)
    ours = {k: v for k, v in values.items() if k not in peer}
    try:
        return {**ours, **translate({BENCH}, {k: values[k] for k in peer}, ours, lambda key, _: f"'engine.{key}'")}
    except ValueError as e:
        raise BenchConfigError(str(e)) from None


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise BenchConfigError(f"unknown key '{section}.{key}'; known keys: {', '.join(sorted(known))}.")
        values[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Accept a value of the declared type (an int where a float is expected; None where optional)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (str, Path)):
            return str(value)
        if kind is bool and isinstance(value, bool):
            return value
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    wanted = " or ".join("null" if k is type(None) else names[k] for k in options)
    raise BenchConfigError(f"'{key}' must be {wanted}, got {value!r} ({type(value).__name__}).")


def _check_values(config: BenchConfig) -> None:
    e, d = config.engine, config.data
    if e.backend not in BACKENDS:
        lmdeploy = [v for row in peer_names(BENCH) if row.name == "backend" for v in row.values or ()]
        raise BenchConfigError(f"'engine.backend' must be one of {', '.join(BACKENDS)} (or LMDeploy's "
                               f"{' / '.join(lmdeploy)}: microscale's engine), got {e.backend!r}.")
    for key, value in (("engine.max_batch_size", e.max_batch_size), ("data.input_len", d.input_len),
                       ("data.output_len", d.output_len), ("data.num_prompts", d.num_prompts),
                       ("engine.max_num_batched_tokens", e.max_num_batched_tokens),
                       ("engine.tensor_parallel_size", e.tensor_parallel_size)):
        if value < 1:
            raise BenchConfigError(f"'{key}' must be at least 1, got {value}.")
    if not 0 < e.cache_max_entry_count <= 1:
        raise BenchConfigError(f"'engine.cache_max_entry_count' must be in (0, 1], got {e.cache_max_entry_count}.")
    if e.gpu_memory_utilization is not None and not 0 < e.gpu_memory_utilization <= 1:
        raise BenchConfigError(f"'engine.gpu_memory_utilization' must be in (0, 1], got {e.gpu_memory_utilization}.")
    if e.kv_cache_memory is not None and e.kv_cache_memory <= 0:
        raise BenchConfigError(f"'engine.kv_cache_memory' must be positive GiB, got {e.kv_cache_memory}.")
    if not 0 <= d.range_ratio < 1:
        raise BenchConfigError(f"'data.range_ratio' must be in [0, 1), got {d.range_ratio}.")
    if e.load_format not in ("auto", "safetensors", "dummy"):
        raise BenchConfigError(f"'engine.load_format' must be auto, safetensors or dummy, got {e.load_format!r}.")
    if e.kernel_backend not in ("auto", "torch", "triton"):
        raise BenchConfigError(f"'engine.kernel_backend' must be auto, torch or triton, got {e.kernel_backend!r}.")
    if e.speculative_config is not None:
        try:
            SpeculativeConfig.from_json(e.speculative_config)
        except ValueError as error:
            raise BenchConfigError(f"'engine.speculative_config': {error}") from None
    if e.backend == "transformers" and (e.quant != "none" or e.kv_cache_quant != "none"):
        raise BenchConfigError("'engine.backend: transformers' is the unquantized baseline: set quant and "
                               "kv_cache_quant to none.")


def add_override_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One flag per setting of `sections`, named after its key (`--max-batch-size`, `--dataset-path`, ...)."""
    for section in sections:
        cls = _SECTIONS[section]
        group = parser.add_argument_group(f"{section} (override the YAML)")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            options = typing.get_args(hints[f.name]) or (hints[f.name],)
            kind = next(k for k in options if k is not type(None))
            flag, dest, doc = f"--{f.name.replace('_', '-')}", f"{section}__{f.name}", f"{section}.{f.name}"
            if kind is bool:  # a switch: present means true (None: the YAML's or the default)
                group.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=doc)
                continue
            group.add_argument(flag, dest=dest, type=kind, default=None, help=f"{doc} (default: {f.default!r})")
        if section == "engine":
            known = {f.name for f in fields(cls)}
            for row in peer_names(BENCH):
                if row.name not in known:
                    group.add_argument(f"--{row.name.replace('_', '-')}", dest=f"engine__{row.name}", type=row.kind,
                                       default=None, help=f"{row.peer}'s name for engine.{row.ours}")


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for dest, value in vars(args).items():
        section, sep, key = dest.partition("__")
        if sep and section in out:
            out[section][key] = value
    return out
