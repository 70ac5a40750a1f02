"""Token embeddings and the LM head, vocabulary-parallel: with tensor parallelism each rank holds a contiguous
slice of the vocabulary (padded to a multiple of tp_size); lookups are summed over ranks (a token's row lives
on one rank, the others give zeros) and the LM head's logits are gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from microscale.distributed.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size
from microscale.kernels.cpu_linear import dense_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def _my_rows(self) -> int:
        return max(0, min(self.rows, self.vocab_size - self.start))

    def checkpoint_slice(
        self, name: str, shard: int | None, shape: tuple[int, ...], dtype: str
    ) -> tuple[int, int, int] | None:
        """This rank's vocabulary rows, read alone (see Linear.checkpoint_slice)."""
        return (0, self.start, self._my_rows()) if tp_size() > 1 and name == "weight" else None

    def load_weight(self, name: str, loaded: torch.Tensor, shard: int | None = None) -> list[str]:
        """The whole vocabulary, or (read as such) this rank's rows of it."""
        whole = loaded.shape[0] == self.vocab_size
        if name != "weight" or not (whole or loaded.shape[0] == self._my_rows()):
            raise ValueError(f"Embedding tensor {name!r} of shape {tuple(loaded.shape)} does not fit "
                             f"[{self.vocab_size}, hidden].")
        mine = loaded[self.start : self.start + self.rows] if whole else loaded
        self.weight.data[: len(mine)].copy_(mine)  # rows past the vocabulary (padding) stay zero
        return ["weight"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        elsewhere = (local < 0) | (local >= self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight).masked_fill_(elsewhere[:, None], 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden @ W^T over the whole vocabulary: each rank computes its slice, then they are gathered.
    A model with tied embeddings points `weight` at the embedding's (the same vocabulary slice)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(dense_linear(hidden, self.weight))[..., : self.vocab_size]
