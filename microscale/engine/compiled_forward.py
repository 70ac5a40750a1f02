"""The model's forward compiled for the CPU with torch.compile: Inductor turns the per-layer work (norms, rotary,
residual adds, the SwiGLU) into a few C++ loops from the machine's compiler around the matmuls, where eager
PyTorch pays Python and dispatch overhead for every small op (at batch 1 that overhead is most of a step).

Two graphs serve every step: one for a single token (batch-1 decode), one whose token count is a dynamic
dimension (decode batches and prefill chunks of any larger size reuse it). Two opaque ops sit inside them:
attention, which reads the step's Python-side metadata (microscale::attention, layers/attention.py), and the
linear layers' matmul, which picks the C product for up to 8 rows or BLAS when it runs
(microscale::dense_linear, kernels/cpu_linear.py). Compiled artefacts persist on disk
(Inductor's FX graph and AOTAutograd caches), so a second start of the same model skips the C++ compiler.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from microscale.attention.metadata import AttentionMetadata
from microscale.cache_dir import microscale_cache_dir
from microscale.layers.attention import Attention, compiled_step


def inductor_cache_dir() -> Path:
    """Where compiled graphs persist between starts: $TORCHINDUCTOR_CACHE_DIR when set, else microscale's folder
    in the user's cache, not Inductor's default under /tmp, which a reboot empties."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and chosen != default_cache_dir():  # importing torch._dynamo fills in Inductor's default
        return Path(chosen)
    return microscale_cache_dir() / "inductor"


def compile_disabled_reason() -> str | None:
    """Why torch.compile would not compile here (it then returns functions unchanged), or None."""
    if torch._dynamo.config.disable:
        return "torch.compile is disabled in this process (TORCH_COMPILE_DISABLE=1)"
    return None


def compile_cache_hits() -> int:
    """Graphs this process has taken from the disk caches so far (Inductor's and AOTAutograd's)."""
    counters = torch._dynamo.utils.counters
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


class CompiledForward:
    """Called like the model: (input_ids, positions, meta) -> hidden states. Compiles on its first call."""

    def __init__(self, model: nn.Module, attention_layers: list[Attention]) -> None:
        self.model = model
        self.attention_layers = attention_layers
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())  # read by Inductor when it compiles
        # C++ compiles in this process: Inductor's parallel-compile pool (a sidecar process forking workers) can
        # wait forever in containers and CI (a test run here hung on it until CI's limit); on a small CPU it
        # saves a few seconds of a first start only, and cached starts compile nothing.
        inductor_config.compile_threads = 1
        # fullgraph: a graph break would leave eager islands and guard checks in every step; better to fail at
        # start-up (the runner then stays eager and logs why).
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, None)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # One token keeps its own static graph (Dynamo's 0/1 specialisation); more share the dynamic one.
        if input_ids.shape[0] > 1:
            for tensor in (input_ids, positions):
                torch._dynamo.mark_dynamic(tensor, 0)
        with compiled_step(self.attention_layers, meta):
            return self._compiled(input_ids, positions)
