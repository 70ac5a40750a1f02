"""Structured outputs on llguidance (chosen by measurement: benchmarks/results/grammar-engines.md): a grammar
matcher per constrained sequence, the vocabulary mask it allows at each step, and the token it then consumes.
Compiling a grammar takes well under a few milliseconds even on a 150k vocabulary, so grammars are built per
request, no cache needed."""

from __future__ import annotations

import functools
import json

import llguidance
import torch

from microscale.sampling_params import SamplingParamError, StructuredOutputsParams
from microscale.tokenizer import Tokenizer


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers over one tokenizer's vocabulary (built once: ~1 s)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos_token_ids)

    def matchers(self, params: StructuredOutputsParams, count: int = 1) -> list[llguidance.LLMatcher]:
        """`count` fresh matchers at the start of the language (one per sample of a request; the grammar is built
        once); an invalid grammar is the request's error."""
        first = llguidance.LLMatcher(self._tokenizer, _grammar(params), log_level=0)
        if first.is_error():
            raise _grammar_error(first.get_error())
        return [first] + [first.deep_copy() for _ in range(count - 1)]


# JSON without free whitespace between tokens (", " and ": " separators): a weak or unsure model could otherwise
# spend its whole budget on blanks. A schema may still ask for other layouts through its "x-guidance" options.
_JSON_LAYOUT = {"whitespace_flexible": False}


def check_grammar(params: StructuredOutputsParams) -> None:
    """Raise the request's error for a grammar that does not compile (no tokenizer needed: the server's front
    answers 400 before the request reaches the engine)."""
    error = llguidance.LLMatcher.validate_grammar(_grammar(params))
    if error:
        raise _grammar_error(error)


def _grammar_error(message: str) -> SamplingParamError:
    # llguidance points at the error over several lines; one line reads better in a 400 body and on a CLI.
    return SamplingParamError("structured_outputs", "structured_outputs: " + " ".join(message.split()))


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


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next (filled on the host as a bitmask,
    unpacked on `device` in one vectorised step)."""
    words = -(-vocab_size // 32)
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
    _executor().unsafe_compute_mask_ptr(list(zip(matchers, range(len(matchers)))), bitmask.data_ptr(), words * 4,
                                        len(matchers))
    bits = torch.arange(32, dtype=torch.int32, device=device)
    unpacked = (bitmask.to(device)[:, :, None] >> bits) & 1  # [rows, words, 32]: bit j of word w is token 32w + j
    return unpacked.flatten(1)[:, :vocab_size].bool()
