"""LMDeploy's and vLLM's names for microscale's settings, in one table, so that their users' commands and bench
files run unchanged: the engine commands' flags (`--quant-policy 4`), `serve`'s (`--server-port`), the bench
YAML's engine keys (`quant_policy: 4`, `backend: turbomind`) and `serve api_server MODEL`. Each use is logged
with what it set; a value the peer itself would reject fails naming the peer's key.

Only names that mean the same thing are here. Flags that both peers and microscale spell alike
(`--max-model-len`, `--max-num-seqs`, `--tensor-parallel-size`, `--gpu-memory-utilization`,
`--cache-max-entry-count`, `--served-model-name`, `--chat-template`, `--tp`) are microscale's own."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Scopes: "engine": every engine command's flags; "serve": serve's own flags; "bench": the bench YAML's engine
# section and `bench throughput`'s flags of the same names.
ENGINE, SERVE, BENCH = "engine", "serve", "bench"


@dataclass(frozen=True)
class PeerName:
    peer: str  # "LMDeploy" or "vLLM"
    name: str  # the peer's key; its flag is --name-with-dashes
    ours: str | None  # the setting it sets (None: nothing to set, the note says why)
    scopes: frozenset[str]
    # The values the peer accepts -> ours (None: leave ours at its default). None: any value of `kind`, as is.
    values: Mapping[Any, Any] | None = None
    kind: type = str
    positive: bool = False  # the peer rejects values below 1
    note: str = ""  # said in the log line, after what was set
    allowed: str = field(default="", compare=False)  # the peer's values explained, in errors and help

    def convert(self, value: Any, spelled: str) -> Any:
        """The value for `ours`; a ValueError naming the key (as `spelled`) for one the peer rejects."""
        if self.values is not None and value not in self.values:
            choices = ", ".join(str(v) for v in self.values)
            raise ValueError(f"{spelled} must be one of {choices}{f' ({self.allowed})' if self.allowed else ''}, "
                             f"got {value!r}.")
        if self.positive and value < 1:
            raise ValueError(f"{spelled} must be at least 1, got {value}.")
        return value if self.values is None else self.values[value]


_E, _S, _B, _EB = frozenset({ENGINE}), frozenset({SERVE}), frozenset({BENCH}), frozenset({ENGINE, BENCH})
_KV_POLICY = "LMDeploy's quant_policy: 0 = 16-bit KV cache, 4 = int4, 8 = int8"

PEER_NAMES: tuple[PeerName, ...] = (
    # LMDeploy (lmdeploy serve api_server, lmdeploy chat, its benchmark configs)
    PeerName("LMDeploy", "backend", None, _E, {"turbomind": None, "pytorch": None},
             note="microscale runs its own engine in place of LMDeploy's", allowed="LMDeploy's engines"),
    PeerName("LMDeploy", "backend", "backend", _B, {"turbomind": "microscale", "pytorch": "microscale"},
             note="microscale's engine runs in place of LMDeploy's"),
    PeerName("LMDeploy", "quant_policy", "kv_cache_quant", _EB, {0: None, 4: "int4", 8: "int8"}, kind=int,
             allowed=_KV_POLICY),
    PeerName("LMDeploy", "session_len", "max_model_len", _EB, kind=int, positive=True),
    PeerName("LMDeploy", "max_batch_size", "max_num_seqs", _E, kind=int, positive=True),
    PeerName("LMDeploy", "server_name", "host", _S),
    PeerName("LMDeploy", "server_port", "port", _S, kind=int),
    # vLLM (vllm serve, its engine arguments)
    PeerName("vLLM", "kv_cache_dtype", "kv_cache_quant", _EB, {"auto": None, "fp8": "fp8", "fp8_e4m3": "fp8"},
             allowed="vLLM's KV cache dtypes microscale has: fp8 is E4M3 with a per-tensor scale in both"),
    # vLLM's fp8 quantizes a 16-bit checkpoint's weights at load time with no calibration: microscale's
    # fp8-dynamic (per-channel weight scales, per-token activation scales, where vLLM's are per tensor).
    PeerName("vLLM", "quantization", "quantization", _E, {"fp8": "fp8-dynamic", "mxfp4": "mxfp4"},
             note="load-time quantization, no calibration",
             allowed="vLLM's methods microscale has; microscale's own formats are --quant's"),
)

# Whole command words: LMDeploy's `lmdeploy serve api_server MODEL` is `microscale serve MODEL`.
PEER_COMMANDS: dict[tuple[str, ...], tuple[str, ...]] = {("serve", "api_server"): ("serve",)}


def peer_names(scope: str) -> list[PeerName]:
    return [row for row in PEER_NAMES if scope in row.scopes]


def translate_command(argv: list[str]) -> list[str]:
    """argv with a peer's command words (followed by something: a model) replaced by microscale's."""
    for words, ours in PEER_COMMANDS.items():
        if tuple(argv[:len(words)]) == words and len(argv) > len(words):
            logger.info("`%s` is LMDeploy's name for `microscale %s`", " ".join(words), " ".join(ours))
            return [*ours, *argv[len(words):]]
    return argv


def translate(scopes: Collection[str], peer: Mapping[str, Any], ours_given: Collection[str],
              spell: Callable[[str, bool], str]) -> dict[str, Any]:
    """The settings that the peer names in `peer` ({name: value}, of `scopes`) give, in ours ({key: value}), each
    logged; a peer name whose value means "ours' default" gives nothing. `ours_given`: our keys set beside them.
    `spell(key, is_peer)` writes a key as the user writes it (`--quant-policy`, 'engine.quant_policy'). A value
    the peer rejects, or a peer name given beside the key it sets, is a ValueError naming the key."""
    out: dict[str, Any] = {}
    set_by: dict[str, str] = {}  # our key -> the peer name that set it
    for row in PEER_NAMES:
        if row.name not in peer or row.scopes.isdisjoint(scopes):
            continue
        value = row.convert(peer[row.name], spell(row.name, True))
        if row.ours in ours_given or row.ours in set_by:
            other = spell(set_by[row.ours], True) if row.ours in set_by else spell(row.ours, False)
            raise ValueError(f"{spell(row.name, True)} is {row.peer}'s name for {spell(row.ours, False)}: give "
                             f"{other} or {spell(row.name, True)}, not both.")
        if row.ours is not None:
            set_by[row.ours] = row.name
        if row.ours is not None and value is not None:
            out[row.ours] = value
        target = "nothing" if row.ours is None else \
            f"{spell(row.ours, False)} {'to its default' if value is None else value}"
        logger.info("%s %s (%s's name) sets %s%s", spell(row.name, True), peer[row.name], row.peer, target,
                    f": {row.note}" if row.note else "")
    return out


def bench_peer_keys(values: Mapping[str, Any], native: Collection[str]) -> set[str]:
    """The keys of a bench section's `values` that are peer names to translate: those that are not `native`
    keys, and native ones (backend) holding a peer's value (turbomind)."""
    rows = peer_names(BENCH)
    return {key for key, value in values.items()
            if any(row.name == key and (key not in native or value in (row.values or ())) for row in rows)}


_DEST = "peer:"  # the namespace attribute of a peer flag, until apply_peer_flags replaces it with ours


def add_peer_flags(parser: argparse.ArgumentParser, scope: str) -> None:
    """Add the flags of `scope`'s peer names to `parser`; apply_peer_flags translates them once parsed."""
    group = parser.add_argument_group(f"{scope} flags in LMDeploy's and vLLM's names")
    for row in peer_names(scope):
        helptext = " ".join(filter(None, (
            f"{row.peer}'s name for {_flag_of(parser, row.ours) if row.ours else 'nothing'}",
            f"({row.allowed})" if row.allowed else "", f"- {row.note}" if row.note else "")))
        group.add_argument(f"--{row.name.replace('_', '-')}", dest=_DEST + row.name, type=row.kind,
                           choices=list(row.values) if row.values is not None else None, default=argparse.SUPPRESS,
                           metavar=None if row.values else row.name.upper(), help=helptext)
    parser.set_defaults(peer_scopes=(*(parser.get_default("peer_scopes") or ()), scope))


def apply_peer_flags(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """Replace the peer flags `parser` parsed into `namespace` by the settings they name (ValueError on a bad
    value, or a peer flag given beside microscale's)."""
    peer = {dest[len(_DEST):]: value for dest, value in vars(namespace).items() if dest.startswith(_DEST)}
    if not peer:
        return
    for name in peer:
        delattr(namespace, _DEST + name)
    # Ours count as given when they differ from their defaults.
    given = {dest for dest, value in vars(namespace).items() if value != parser.get_default(dest)}
    spell = lambda key, is_peer: f"--{key.replace('_', '-')}" if is_peer else _flag_of(parser, key)  # noqa: E731
    for key, value in translate(set(namespace.peer_scopes), peer, given, spell).items():
        setattr(namespace, key, value)


def _flag_of(parser: argparse.ArgumentParser, dest: str) -> str:
    """The flag of microscale's that sets `dest`."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[-1]
    return f"--{dest.replace('_', '-')}"
