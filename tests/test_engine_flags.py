"""The engine's command-line flags are derived from EngineArgs: every field is a flag of `serve` and `generate`
(or says why it is not), with its field's help, default and type, and format choices from the registries."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from microscale.cli import build_parser
from microscale.config import EngineArgs
from microscale.engine_flags import add_engine_flags, engine_kwargs
from microscale.quant.config import CalibConfig
from microscale.quant.format import known_weight_formats
from microscale.quant.kv_cache import quantized_kv_cache_names

REQUIRED = {"serve": [], "generate": ["--prompt", "x"]}


def _flag_fields() -> list[dataclasses.Field]:
    """Every field that should have a flag: EngineArgs' own, and the fields of the configs nested in it (a field
    declared as a config first; speculative_config is declared as its JSON dict first: one flag)."""
    hints = typing.get_type_hints(EngineArgs)
    out = []
    for f in dataclasses.fields(EngineArgs):
        declared = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        out += dataclasses.fields(declared) if dataclasses.is_dataclass(declared) else [f]
    return [f for f in out if "not_cli" not in f.metadata]


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_engine_field_is_a_flag_with_its_default(command):
    args = build_parser().parse_args([command, "model-dir", *REQUIRED[command]])
    for f in _flag_fields():
        assert f.name in vars(args), f"{f.name} is not a flag of {command}"
    assert EngineArgs(model=args.model, **engine_kwargs(args)) == EngineArgs(model="model-dir")


def test_fields_off_the_command_line_say_why():
    off = [f for cls in (EngineArgs, CalibConfig) for f in dataclasses.fields(cls) if "not_cli" in f.metadata]
    assert off and all(len(f.metadata["not_cli"]) > 20 for f in off)


def test_help_comes_from_the_field():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    helps = {action.dest: action.help for action in parser._actions}
    for f in _flag_fields():
        assert f.metadata.get("help") and helps[f.name] == f.metadata["help"], f.name


def test_flags_reach_the_engine_args():
    args = build_parser().parse_args([
        "serve", "m", "--no-prefix-caching", "--tp", "2", "--enforce-eager", "--quant", "fp8-dynamic",
        "--kv-cache-quant", "int8", "--calib-data", "c.txt", "--calib-batches", "3", "--swap-space", "0.5",
        "--load-format", "dummy", "--threads", "3",
    ])
    engine = EngineArgs(model=args.model, **engine_kwargs(args))
    assert (engine.enable_prefix_caching, engine.tensor_parallel_size, engine.enforce_eager) == (False, 2, True)
    assert (engine.quantization, engine.kv_cache_quant, engine.swap_space) == ("fp8-dynamic", "int8", 0.5)
    assert engine.calib_config == CalibConfig(calib_dataset="c.txt", calib_batches=3)
    assert (engine.load_format, engine.threads) == ("dummy", 3)


def test_format_choices_come_from_the_registries():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser, only=("quantization", "kv_cache_quant"))
    choices = {action.dest: action.choices for action in parser._actions}
    assert choices["quantization"] == known_weight_formats()
    assert choices["kv_cache_quant"] == quantized_kv_cache_names() == ["fp8", "int4", "int8"]
