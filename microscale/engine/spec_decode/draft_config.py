"""The draft model's config.json, checked against the target before anything is built: the engine's shard and the
planner read it the same way."""

from __future__ import annotations

from pathlib import Path

from microscale.config import ModelConfig, SpeculativeConfig
from microscale.models.loader import load_model_config, resolve_model_path


def draft_model_config(spec: SpeculativeConfig, target: ModelConfig, max_model_len: int) -> tuple[Path, ModelConfig]:
    """The folder and config of speculative method "draft"'s model: it must exist, share the target's vocabulary
    (the same tokenizer), and take max_model_len positions (drafts stop where the target's room does)."""
    try:
        model_dir = resolve_model_path(spec.model)
        cfg = load_model_config(model_dir)
    except ValueError as e:
        raise ValueError(f"speculative_config.model (the draft model): {e}") from None
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config.model {spec.model} has a vocabulary of {cfg.vocab_size} tokens, the "
                         f"target {target.vocab_size}: a draft model must share the target's tokenizer.")
    if cfg.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config.model {spec.model} takes {cfg.max_position_embeddings} positions, "
                         f"fewer than max_model_len {max_model_len}: lower max_model_len.")
    return model_dir, cfg
