"""Structured outputs on llguidance (chosen by measurement: benchmarks/results/grammar-engines.md): grammars
compiled within a time limit and cached by their text, a matcher per constrained sequence, and the masks of a
step's constrained rows filled on a worker thread while the step's forward runs."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import llguidance
import numpy as np
import torch

from microscale.sampling_params import SamplingParamError, StructuredOutputsParams
from microscale.tokenizer import Tokenizer

T = TypeVar("T")

# Compiled grammars kept (a start matcher each): an application sends the same few schemas
# with every request, and those then skip compilation.
GRAMMAR_CACHE_SIZE = 256
# llguidance's own reckoning of its lexer's speed (LLParserLimits: ~50k fuel units per ms): the time limit also
# caps the lexer's work, so that a grammar past it stops itself rather than computing on after its request failed.
_LEXER_FUEL_PER_MS = 50_000


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers over one tokenizer's vocabulary (built at the first structured
    request: ~1 s that engines serving none never pay)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int],
                 max_compile_ms: float) -> None:
        self.vocab_size = vocab_size
        self.max_compile_ms = max_compile_ms
        self._source = tokenizer
        self._eos_token_ids = eos_token_ids
        # Start matchers by grammar text; cache_info() says how many requests skipped compilation.
        self.compiled = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    @functools.cached_property
    def _tokenizer(self) -> llguidance.LLTokenizer:
        # A model run with another model's tokenizer (dummy weights of a real shape, for benchmarks) may have
        # EOS ids the tokenizer does not have: the grammar can end only on those it has.
        eos = [t for t in self._eos_token_ids if t < self._source.vocab_size]
        if not eos:
            raise ValueError(f"Structured outputs need an end-of-sequence token in the tokenizer's vocabulary; the "
                             f"model's EOS ids {self._eos_token_ids} are past its {self._source.vocab_size} tokens.")
        return llguidance.LLTokenizer(self._source.to_json(), n_vocab=self.vocab_size, eos_token=eos)

    def matchers(self, params: StructuredOutputsParams, count: int = 1) -> list[llguidance.LLMatcher]:
        """`count` fresh matchers at the start of the language (one per sample of a request); an invalid grammar,
        or one past the compile limit, is the request's error."""
        start = self.compiled(_grammar(params))
        return [start.deep_copy() for _ in range(count)]  # the cached start matcher itself never moves

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        limit, tokenizer = self.max_compile_ms, self._tokenizer  # built outside the grammar's time limit
        matcher = _within(limit, lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0,
                                                                limits=_parser_limits(limit)))
        if matcher.is_error():
            raise _grammar_error(matcher.get_error(), limit)
        return matcher


# Compact JSON ("," and ":" separators, no free whitespace between tokens): a weak or unsure model could otherwise
# spend its whole budget on blanks. A schema may still ask for other layouts through its "x-guidance" options.
_JSON_LAYOUT = {"whitespace_flexible": False}


def check_grammar(params: StructuredOutputsParams, max_compile_ms: float) -> None:
    """Raise the request's error for a grammar that does not compile, or not within `max_compile_ms` (no
    tokenizer needed: the server's front answers 400 before the request reaches the engine)."""
    error = _validation_error(_grammar(params), max_compile_ms)
    if error:
        raise _grammar_error(error, max_compile_ms)


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _validation_error(grammar: str, max_compile_ms: float) -> str:
    """llguidance's error for the grammar ("" if none), by grammar text: a schema sent again is checked once."""
    return _within(max_compile_ms, lambda: llguidance.LLMatcher.validate_grammar(
        grammar, limits=_parser_limits(max_compile_ms)))


def _parser_limits(max_compile_ms: float) -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(initial_lexer_fuel=max(1, int(max_compile_ms * _LEXER_FUEL_PER_MS)))


def _within(limit_ms: float, compile_grammar: Callable[[], T]) -> T:
    """compile_grammar() on a thread of its own (llguidance releases the GIL while it compiles), waited for at
    most `limit_ms`: past it the request fails while the compilation, capped by its lexer fuel, ends unobserved."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(compile_grammar())
        except BaseException as e:  # handed to the waiting caller
            done.set_exception(e)

    threading.Thread(target=run, name="grammar-compile", daemon=True).start()
    try:
        return done.result(timeout=limit_ms / 1000)
    except concurrent.futures.TimeoutError:
        raise SamplingParamError(
            "structured_outputs", f"structured_outputs: the grammar did not compile within {limit_ms:g} ms "
            "(structured_outputs_max_compile_ms); simplify the schema or raise the limit.") from None


def _grammar_error(message: str, limit_ms: float) -> SamplingParamError:
    # llguidance points at the error over several lines; one line reads better in a 400 body and on a CLI.
    text = "structured_outputs: " + " ".join(message.split())
    if "limit" in message:  # a parser limit (lexer fuel, grammar size) derived from the compile time limit
        text += f" (past what structured_outputs_max_compile_ms={limit_ms:g} allows)"
    return SamplingParamError("structured_outputs", text)


def _grammar(params: StructuredOutputsParams) -> str:
    build = llguidance.LLMatcher
    try:
        if params.json is not None:
            schema = json.loads(params.json) if isinstance(params.json, str) else params.json
            return build.grammar_from_json_schema(schema, defaults=_JSON_LAYOUT)
        if params.json_object:
            return build.grammar_from_json_schema({"type": "object"}, defaults=_JSON_LAYOUT)
        if params.regex is not None:
            return build.grammar_from_regex(params.regex)
        if params.choice is not None:  # Lark string literals are JSON strings
            return build.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        return build.grammar_from_lark(params.grammar)
    except (ValueError, TypeError) as e:  # a schema that is not JSON, or not a JSON object
        raise SamplingParamError("structured_outputs", f"structured_outputs: {e}") from None


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()  # fills the rows' masks on its own threads, without the GIL


@functools.cache
def _mask_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")


def fill_bitmask(matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` ([len(matchers), words] int32 on the host): bit j of word w set when matchers[i]
    allows token 32w + j next."""
    _executor().unsafe_compute_mask_ptr(list(zip(matchers, range(len(matchers)))), bitmask.data_ptr(),
                                        bitmask.shape[1] * 4, len(matchers))


class StepMasks:
    """The allowed-token bitmasks of one step's constrained sequences, filled on a worker thread from the moment
    the step is scheduled: a matcher moves only when the previous step's tokens are consumed, so this host work
    runs while the forward does and sampling waits only for what is left of it."""

    def __init__(self, matchers: list[llguidance.LLMatcher], vocab_size: int) -> None:
        self._bitmask = torch.empty(len(matchers), -(-vocab_size // 32), dtype=torch.int32)
        self._filled = _mask_thread().submit(fill_bitmask, matchers, self._bitmask) if matchers else None

    def row(self, i: int) -> RowMask:
        return RowMask(self, i)

    def bitmask(self) -> torch.Tensor:
        """[matchers, words] int32, once filled (re-raises what the fill raised)."""
        if self._filled is not None:
            self._filled.result()
        return self._bitmask


@dataclass(frozen=True)
class RowMask:
    """One sampling row's share of its step's masks."""

    masks: StepMasks
    index: int

    def bits(self) -> torch.Tensor:
        return self.masks.bitmask()[self.index]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, words] int32 (on the host) -> [rows, vocab_size] bool on `device`. On the CPU in numpy's one
    single-threaded pass: torch's three elementwise ops would each split over the intra-op threads, which on a busy
    CPU take longer to meet than the work takes (measured: ~9 ms against 12 µs for 32 x 4096 on 2 shared cores).
    On an accelerator the 8x smaller bitmask is copied and unpacked there."""
    if device.type == "cpu":
        return _unpack_on_host(bitmask, vocab_size)
    return _unpack_on_device(bitmask, vocab_size, device)


def _unpack_on_host(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # Little-endian words: byte k of word w holds tokens 32w + 8k ..., its bit b (least significant first) one each.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)


def _unpack_on_device(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int32, device=device)
    unpacked = (bitmask.to(device)[:, :, None] >> bits) & 1  # [rows, words, 32]: bit j of word w is token 32w + j
    return unpacked.flatten(1)[:, :vocab_size].bool()
