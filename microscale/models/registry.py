"""Which model class implements which `architectures` entry of config.json."""

from __future__ import annotations

from torch import nn

from microscale.models.gpt_oss import GptOssForCausalLM
from microscale.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "GptOssForCausalLM": GptOssForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    cls = _ARCHITECTURES.get(architecture)
    if cls is None:
        raise ValueError(f"Unsupported architecture {architecture!r}; supported: {', '.join(sorted(_ARCHITECTURES))}.")
    return cls
