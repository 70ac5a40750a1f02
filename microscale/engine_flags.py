"""The engine's command-line flags, derived from EngineArgs: one flag per field, named after it (`--max-num-seqs`)
unless its metadata names others, with the help its metadata gives and the default and type its declaration
gives; a bool is a switch. A nested config (CalibConfig) is a flag per field of its own. Format choices come
from the format registries. So a new EngineArgs field is a flag of every engine command at once."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection
from typing import Any

from microscale.config import EngineArgs
from microscale.quant.format import known_weight_formats
from microscale.quant.kv_cache import quantized_kv_cache_names

# Fields whose choices are whatever their registry holds when the parser is built.
_REGISTRY_CHOICES: dict[str, Callable[[], list[str]]] = {
    "quantization": known_weight_formats,
    "kv_cache_quant": quantized_kv_cache_names,
}


def _kind(cls: type, name: str) -> type:
    """The declared type of field `name` of dataclass `cls`, without its `| None`."""
    hint = typing.get_type_hints(cls)[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next(option for option in options if option is not type(None))


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "not_cli" not in f.metadata]


def add_engine_flags(
    parser: argparse.ArgumentParser, only: Collection[str] | None = None
) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags of every EngineArgs field (or of the fields in `only`) to `parser`, in argument groups
    named by the fields' metadata ("engine" unless set); returns the groups by name."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in _cli_fields(EngineArgs):
        if only is not None and f.name not in only:
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=f.metadata.get("help"))
            continue
        name = f.metadata.get("group", "engine")
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        group = groups[name]
        kind = _kind(EngineArgs, f.name)
        if dataclasses.is_dataclass(kind):
            for nested in _cli_fields(kind):
                _add_flag(group, nested, _kind(kind, nested.name))
        else:
            _add_flag(group, f, kind)
    return groups


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, kind: type) -> None:
    meta = f.metadata
    flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
    options: dict[str, Any] = {"dest": f.name, "help": meta.get("help")}
    if kind is bool:  # a switch that turns the default over
        options["action"] = "store_false" if f.default else "store_true"
    else:
        options["default"] = f.default
        if kind in (int, float):
            options["type"] = kind
        choices = _REGISTRY_CHOICES[f.name]() if f.name in _REGISTRY_CHOICES else meta.get("choices")
        if choices is not None:
            options["choices"] = list(choices)
        if "metavar" in meta:
            options["metavar"] = meta["metavar"]
    group.add_argument(*flags, **options)


def engine_kwargs(args: argparse.Namespace, only: Collection[str] | None = None) -> dict[str, Any]:
    """EngineArgs keyword arguments from flags that `add_engine_flags(parser, only)` added (positional ones,
    the model, excepted). A nested config is None unless the flag of its `set_by` field was given."""
    kwargs: dict[str, Any] = {}
    for f in _cli_fields(EngineArgs):
        if (only is not None and f.name not in only) or f.metadata.get("positional"):
            continue
        kind = _kind(EngineArgs, f.name)
        if not dataclasses.is_dataclass(kind):
            kwargs[f.name] = getattr(args, f.name)
        elif getattr(args, f.metadata["set_by"]) is None:
            kwargs[f.name] = None
        else:
            kwargs[f.name] = kind(**{nested.name: getattr(args, nested.name) for nested in _cli_fields(kind)})
    return kwargs
