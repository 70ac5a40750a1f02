"""microscale: an LLM inference and serving engine (PyTorch + Triton)."""

from microscale.llm import LLM
from microscale.logger import init_logging
from microscale.outputs import CompletionOutput, Logprob, RequestOutput
from microscale.quant.config import CalibConfig, QuantAlgo, QuantConfig
from microscale.sampling_params import SamplingParams, StructuredOutputsParams
from microscale.version import __version__

init_logging()

__all__ = [
    "LLM", "SamplingParams", "StructuredOutputsParams", "QuantConfig", "QuantAlgo", "CalibConfig", "RequestOutput",
    "CompletionOutput", "Logprob", "__version__",
]
