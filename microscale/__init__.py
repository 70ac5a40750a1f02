"""microscale: an LLM inference and serving engine (PyTorch + Triton)."""

from microscale.llm import LLM
from microscale.outputs import CompletionOutput, Logprob, RequestOutput
from microscale.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
