"""shoal: run one open-weight language model on whatever chips you have.

Public API: `LLM` and `SamplingParams`.
"""

from shoal.torch_extensions import import_torch

import_torch()  # before anything else imports torch: a broken device extension must not break shoal

from shoal.llm import LLM  # noqa: E402
from shoal.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
