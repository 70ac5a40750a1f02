"""InputProcessor: a user's prompt and sampling settings -> checked engine input, with no model weights.

The engine builds one; so does the server's front process, which tokenizes, applies chat templates and
rejects bad requests (400) while the engine process only steps the model.
"""

from __future__ import annotations

from typing import Any

from microscale.config import EngineArgs
from microscale.models.loader import load_generation_config, load_model_config, resolve_model_path
from microscale.sampling_params import SamplingParams
from microscale.tokenizer import Tokenizer, load_chat_template

# generation_config.json keys that become the default SamplingParams (as vLLM does).
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}

PromptType = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(self, args: EngineArgs) -> None:
        self.model_dir = model_dir = resolve_model_path(args.model)
        self.model_config = cfg = load_model_config(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(resolve_model_path(args.tokenizer) if args.tokenizer else model_dir)
        if args.chat_template is not None:
            self.tokenizer.chat_template = load_chat_template(args.chat_template)
        generation_config = load_generation_config(model_dir)
        self.eos_token_ids = self._eos_ids(generation_config)
        self.generation_defaults = {
            ours: generation_config[key] for key, ours in _GENERATION_DEFAULTS.items() if key in generation_config
        }
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        self.structured_outputs_max_compile_ms = args.structured_outputs_max_compile_ms

    def _eos_ids(self, generation_config: dict[str, Any]) -> list[int]:
        eos = generation_config.get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
        if self.model_config.eos_token_ids:
            return self.model_config.eos_token_ids
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"A prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}.")

    def validate_prompt(self, ids: list[int], room_to_generate: bool = True) -> None:
        """A clear ValueError for token ids the engine cannot take: empty, too long, outside the vocabulary."""
        max_len = self.max_model_len
        if not ids:
            raise ValueError("The prompt is empty.")
        if len(ids) > max_len or (room_to_generate and len(ids) == max_len):
            raise ValueError(
                f"The prompt has {len(ids)} tokens; max_model_len is {max_len}"
                + (", which leaves no room to generate." if room_to_generate else ".")
            )
        self.check_vocabulary(ids, "Prompt token ids")

    def check_vocabulary(self, ids: list[int], what: str = "Token ids") -> None:
        """A ValueError for ids outside the vocabulary (the tokenizer would raise on them, or overflow)."""
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"{what} must be in [0, {vocab}).")

    def check_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """A ValueError when the prompt and max_tokens together pass the context length: the output would stop
        short of max_tokens (the server answers 400; `microscale generate` refuses up front)."""
        max_len = self.max_model_len
        if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
            raise ValueError(f"The prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}: more than "
                             f"the context length ({max_len}); shorten the prompt or lower max_tokens.")
