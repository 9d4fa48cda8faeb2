"""EngineConfig: every choice about how a model is run, validated once, here.

`LLM(...)`, `shoal generate` and `shoal chat` all build one; later options (quantization,
parallel sizes, cache sizes) are added as fields here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.errors import InvalidRequestError
from shoal.models.hf_config import parse_dtype

DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint folder or hub id; None means the bundled demo model
    device: str | None = None  # "cpu", "cuda:1", "npu", ...; None or "auto" picks the best present device
    dtype: str | torch.dtype | None = None  # None or "auto": the checkpoint's dtype if the device has it
    max_model_len: int | None = None  # context cap; None means the model's max_position_embeddings
    progress: bool = True  # progress bars on loading

    def __post_init__(self) -> None:
        self.torch_dtype = parse_dtype(self.dtype)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def model_path(self) -> str:
        return str(self.model) if self.model else str(DEMO_MODEL_PATH)
