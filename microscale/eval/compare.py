"""A quantized model against its reference on the same tokens: mean KL divergence of the next-token
distributions (reference || quantized), top-1 agreement, and both perplexities."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


def compare(reference: LLMEngine, quantized: LLMEngine, text: str, context: int = 512, stride: int | None = None,
            max_windows: int | None = None) -> Comparison:
    ids = reference.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise ValueError("The text is too short to compare on (fewer than 2 tokens).")
    kl = agree = nll_ref = nll_quant = 0.0
    tokens = 0
    pairs = zip(window_logits(reference, ids, context, stride, max_windows),
                window_logits(quantized, ids, context, stride, max_windows))
    for (ref_logits, targets), (quant_logits, _) in pairs:
        ref_logp, quant_logp = ref_logits.log_softmax(-1), quant_logits.to(ref_logits.device).log_softmax(-1)
        kl += (ref_logp.exp() * (ref_logp - quant_logp)).sum().item()
        agree += (ref_logits.argmax(-1) == quant_logits.to(ref_logits.device).argmax(-1)).sum().item()
        nll_ref -= ref_logp.gather(1, targets[:, None]).sum().item()
        nll_quant -= quant_logp.gather(1, targets[:, None].to(quant_logp.device)).sum().item()
        tokens += len(targets)
    ppl_ref, ppl_quant = math.exp(nll_ref / tokens), math.exp(nll_quant / tokens)
    return Comparison(
        kl_mean=kl / tokens, top1_agreement=agree / tokens, ppl_ref=ppl_ref, ppl_quant=ppl_quant,
        ppl_delta_pct=100 * (ppl_quant / ppl_ref - 1), tokens=tokens,
    )
