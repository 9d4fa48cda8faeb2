"""shoal: run one open-weight language model on whatever chips you have.

Public API: `LLM` and `SamplingParams`.
"""

from shoal.llm import LLM
from shoal.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
