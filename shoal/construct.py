"""Builds a model's modules for a device and fills them: the checkpoint format's loaders (loader.py for
safetensors folders, gguf/loader.py for GGUF files) both come here, with the chosen dtype, weight format
and the backend's operations bound once (Backend.ops), then stream the weights in.
"""

from __future__ import annotations

import contextlib

import torch

from shoal.backends.base import Backend
from shoal.backends.ops import bind_ops
from shoal.errors import DeviceError
from shoal.models import CausalLM, model_class
from shoal.models.hf_config import ModelConfig


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def choose_dtype(config: ModelConfig, backend: Backend, requested: torch.dtype | None) -> torch.dtype:
    """The requested dtype, else the checkpoint's if the device computes in it, else the device's default."""
    supported = backend.supported_dtypes()
    if requested is not None:
        if requested not in supported:
            names = ", ".join(str(d).removeprefix("torch.") for d in supported)
            raise DeviceError(f"device {backend.name} cannot compute in {requested}; choose one of {names}")
        return requested
    # Keep the checkpoint's dtype only where the hardware computes in it natively: bf16 emulated on an
    # AVX2 CPU is far slower than float32.
    if config.checkpoint_dtype in backend.native_dtypes():
        return config.checkpoint_dtype
    return backend.default_dtype()


def build_on_meta(cls: type[CausalLM], config: ModelConfig, backend: Backend, dtype: torch.dtype) -> CausalLM:
    """The model's modules with every parameter and buffer on the meta device: shapes only, nothing
    allocated. Layers can then be swapped (quantized, split) before `materialize` gives the rest storage."""
    with _default_dtype(dtype), torch.device("meta"):
        return cls(config, backend)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give every parameter still on the meta device empty storage on `device` (the checkpoint fills it:
    load_weights reports any it lacks), and let each module that derives buffers (rotary tables, expert
    counters) compute them there."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=False)
        if any(b is not None and b.device.type == "meta" for b in module._buffers.values()):
            rebuild = getattr(module, "materialize_buffers", None)
            if rebuild is None:
                raise TypeError(f"{type(module).__name__} holds buffers but has no materialize_buffers(device) "
                                "to compute them after a meta-device build: define one")
            rebuild(device)


def construct_model(config: ModelConfig, backend: Backend, device: torch.device, dtype: torch.dtype, plan,
                    kernels: str = "auto") -> CausalLM:
    """The model's modules on `device`, built on the meta device first, so that quantized layers swapped
    in when `plan` (a QuantPlan) says so never had their full-precision parameters allocated."""
    from shoal.quant.plan import apply_plan

    model = build_on_meta(model_class(config), config, backend, dtype)
    if plan is not None and plan.changes_model:
        apply_plan(model, plan, backend, dtype, device, kernels)
    materialize(model, device)
    bind_ops(model, backend.ops(kernels))
    return model


def load_into(model: CausalLM, stream, close, plan) -> CausalLM:
    """Load (checkpoint name, tensor) pairs into the model; `close` ends the stream's progress bar."""
    from shoal.quant.plan import prepare_for_kernels

    try:
        model.load_weights(stream)
    finally:
        close()  # close the progress bar now, before any error message is printed
    if plan is not None and plan.changes_model and plan.prepare:
        prepare_for_kernels(model)
    if plan is None or plan.prepare:
        model.ops.prepare_weights(model)
    model.eval()
    return model
