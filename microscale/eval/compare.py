"""A quantized model against its reference on the same tokens: mean KL divergence of the next-token
distributions (reference || quantized), top-1 agreement, and both perplexities."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from microscale.engine.engine import LLMEngine
from microscale.eval.perplexity import window_logits


@dataclass
class Comparison:
    kl_mean: float
    top1_agreement: float
    ppl_ref: float
    ppl_quant: float
    ppl_delta_pct: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


Window = tuple[torch.Tensor, torch.Tensor]  # logits predicting the scored tokens [n, vocab], the tokens [n]


def compare(reference: LLMEngine, quantized: LLMEngine, text: str, context: int = 512, stride: int | None = None,
            max_windows: int | None = None) -> Comparison:
    ids = reference.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise ValueError("The text is too short to compare on (fewer than 2 tokens).")
    return compare_windows(window_logits(reference, ids, context, stride, max_windows),
                           window_logits(quantized, ids, context, stride, max_windows))


def compare_windows(reference: Iterable[Window], quantized: Iterable[Window]) -> Comparison:
    """The comparison over paired windows of the same tokens (the reference's may be computed once, kept)."""
    kl = agree = nll_ref = nll_quant = 0.0
    tokens = 0
    for (ref_logits, targets), (quant_logits, _) in zip(reference, quantized):
        quant_logits = quant_logits.to(ref_logits.device)
        ref_logp, quant_logp = ref_logits.log_softmax(-1), quant_logits.log_softmax(-1)
        kl += (ref_logp.exp() * (ref_logp - quant_logp)).sum().item()
        agree += (ref_logits.argmax(-1) == quant_logits.argmax(-1)).sum().item()
        nll_ref -= ref_logp.gather(1, targets[:, None]).sum().item()
        nll_quant -= quant_logp.gather(1, targets[:, None]).sum().item()
        tokens += len(targets)
    ppl_ref, ppl_quant = math.exp(nll_ref / tokens), math.exp(nll_quant / tokens)
    return Comparison(
        kl_mean=kl / tokens, top1_agreement=agree / tokens, ppl_ref=ppl_ref, ppl_quant=ppl_quant,
        ppl_delta_pct=100 * (ppl_quant / ppl_ref - 1), tokens=tokens,
    )
