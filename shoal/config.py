"""EngineConfig: every choice about how a model is run, validated once, here.

`LLM(...)`, `shoal generate` and `shoal chat` all build one; later options (quantization,
parallel sizes, cache sizes) are added as fields here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.errors import InvalidRequestError
from shoal.layers.kv_quant import parse_kv_cache_dtype
from shoal.models.hf_config import parse_dtype

DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint folder or hub id; None means the bundled demo model
    device: str | None = None  # "cpu", "cuda:1", "npu", ...; None or "auto" picks the best present device
    dtype: str | torch.dtype | None = None  # None or "auto": the checkpoint's dtype if the device has it
    max_model_len: int | None = None  # context cap; None means the model's max_position_embeddings
    progress: bool = True  # progress bars on loading
    kv_cache_memory: int | None = None  # bytes for the paged KV cache; None: sized from free memory
    max_num_seqs: int = 64  # sequences batched together at most
    max_num_batched_tokens: int = 2048  # tokens per step at most; long prompts are prefilled in chunks
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (the compute dtype), "int8" or "fp8": 8-bit codes + per-vector scales
    quant: str | None = None  # "int8", "int4" or "fp8": store the weights quantized (see shoal/quant/)
    quant_group_size: int | None = None  # int4 inputs per scale (32, 64, 128); None: the checkpoint's, else 64
    # Many devices as one (shoal/parallel): tensor, expert and pipeline ranks; splits; how workers start.
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pp_layers: str | list[int] | None = None  # "10,14", or "auto" (by measured speed); None: even
    ep_weights: str | list[float] | None = None  # "3,1", or "auto"; None: even
    distributed_executor: str = "mp"  # "mp" (this host), "torchrun", "ray"
    collective_timeout: float = 120.0  # seconds before a silent worker fails the engine
    # Which kernels the backend runs (see Backend.ops): "auto" its own where they are faster on this
    # machine, "shoal" its own wherever they are built, "torch" PyTorch's only. None: "torch" when the
    # environment says SHOAL_CPU_KERNELS=0, else "auto".
    cpu_kernels: str | None = None
    # The instruction-set level the CPU kernels are built for (shoal/backends/cpu/isa.py): "native",
    # "avx512", "avx2" or "portable"; one per process. None: SHOAL_CPU_ISA, else native.
    cpu_isa: str | None = None
    enforce_eager: bool = False  # never record and replay a decode step (vLLM's flag of the same name)
    # Speculative decoding (shoal/engine/speculative.py): "ngram" (prompt lookup) or "mtp" (the checkpoint's
    # DeepSeek multi-token-prediction module); draft tokens per step, None: 4 for ngram, 2 for mtp.
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    # Draft only while at most this many sequences run (vLLM's speculative_disable_by_batch_size): past it a
    # CPU step is bound by the rows it computes, not the weights it reads, and verifying k + 1 rows per
    # sequence costs more than it saves (BENCHMARKS.md, speculative decoding). None: always draft.
    speculative_max_batch: int | None = 8

    def __post_init__(self) -> None:
        from shoal.quant.plan import check_quant_options

        self.torch_dtype = parse_dtype(self.dtype)
        self.kv_quant = parse_kv_cache_dtype(self.kv_cache_dtype)
        check_quant_options(self.quant, self.quant_group_size)
        from shoal.parallel.config import ParallelConfig

        self.parallel = ParallelConfig(self.tp, self.ep, self.pp, self.pp_layers, self.ep_weights,
                                       self.distributed_executor, self.collective_timeout)
        for name in ("max_model_len", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {value}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_speculative()
        if self.cpu_kernels is None:
            from shoal.backends.ops import default_kernels

            self.cpu_kernels = default_kernels()
        from shoal.backends.ops import ISA_LEVELS, KERNEL_CHOICES

        if self.cpu_kernels not in KERNEL_CHOICES:
            raise InvalidRequestError(
                f"cpu_kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.cpu_kernels!r}")
        if self.cpu_isa is not None and self.cpu_isa not in ISA_LEVELS:
            raise InvalidRequestError(f"cpu_isa must be one of {', '.join(ISA_LEVELS)}, got {self.cpu_isa!r}")

    def _check_speculative(self) -> None:
        from shoal.engine.speculative import SPECULATIVE_METHODS

        if self.speculative in (None, "", "none"):
            self.speculative = None
            if self.num_speculative_tokens:
                raise InvalidRequestError("num_speculative_tokens needs speculative decoding: add --speculative ngram "
                                          "(any model) or --speculative mtp (DeepSeek-V3 with its MTP module)")
            self.num_speculative_tokens = 0
            return
        if self.speculative not in SPECULATIVE_METHODS:
            raise InvalidRequestError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, "
                                      f"got {self.speculative!r}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = 4 if self.speculative == "ngram" else 2
        if not 1 <= self.num_speculative_tokens <= 16:
            raise InvalidRequestError(f"num_speculative_tokens must be 1 to 16, got {self.num_speculative_tokens}")
        if self.speculative_max_batch is not None and self.speculative_max_batch < 1:
            raise InvalidRequestError("speculative_max_batch must be at least 1 (None: draft at any batch size), "
                                      f"got {self.speculative_max_batch}")
        if self.parallel.enabled:
            raise InvalidRequestError("speculative decoding runs on one device for now; drop --tp / --ep / --pp "
                                      "or --speculative")

    @property
    def model_path(self) -> str:
        return str(self.model) if self.model else str(DEMO_MODEL_PATH)
