"""Shared by the parity tests: transformers as the reference (logits, greedy continuations) and the same
calls on microscale's side."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers

from microscale import LLM, SamplingParams

ATOL = 1e-4  # float32 logits


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # Greedy continuations run to max_new_tokens, like microscale's ignore_eos=True.
    model.generation_config.eos_token_id = None
    return model.eval()


def small_llm(path: Path, dtype: str = "float32", **kwargs) -> LLM:
    return LLM(str(path), dtype=dtype, max_model_len=256, max_num_seqs=4, **kwargs)


def prompt_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32: microscale's logits at every prompt position."""
    return llm.engine.prompt_logits(token_ids).cpu()


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([token_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(token_ids) :].tolist()
    assert len(new) == max_new_tokens
    return new


def ms_greedy(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


