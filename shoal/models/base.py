"""What every model family provides to the runner and the loader: a forward over (token ids, positions,
cache handle), logits, a cache factory, and weight loading from checkpoint names.

Families map checkpoint names onto their modules with `merged_weights` (several checkpoint matrices
stored as one merged parameter); everything else loads by its exact name.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops
from shoal.errors import WeightError
from shoal.layers.kv_cache import ContiguousKVCache
from shoal.layers.linear import copy_weight
from shoal.models.hf_config import ModelConfig

log = logging.getLogger(__name__)


class CausalLM(nn.Module):
    """Base of every family. Subclasses build `self.model`-style submodules named as in the checkpoint."""

    # (checkpoint fragment, merged module fragment, shard name), e.g. (".q_proj.", ".qkv_proj.", "q_proj")
    merged_weights: tuple[tuple[str, str, str], ...] = ()
    # (checkpoint fragment, module fragment): a family whose checkpoints spell a module another way than
    # the shared layers name it, e.g. Mixtral's (".block_sparse_moe.", ".mlp."); applied before all else.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # Set by shoal.parallel when the model is split: ranks the attention heads are split over, and a
    # filter for checkpoint tensors that belong to other pipeline stages.
    tp_size: int = 1
    skip_weight = None
    ops: Ops = REFERENCE  # the backend's, bound with every layer's once the model is built (bind_ops)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.sliding_window: int | None = None

    # ---- the runner's view ----------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """token_ids and positions [batch, tokens] -> final hidden states [batch, tokens, hidden].

        Every family is embed -> decoder layers -> final norm under `self.model`; each layer takes
        (hidden, positions, cache). A decode step (one new token per sequence, with the backend's decode
        attention) goes through the backend's step graphs (Ops.step_graphs), which may replay it in one
        call instead of running the layers from Python; the result is the same.
        """
        cache.begin_forward(positions, self.sliding_window)
        x = self.model.embed_tokens(token_ids)
        return self.decode_step("_step_graphs", cache, x, lambda h: self.decoder(h, positions, cache))

    def decode_step(self, graphs: str, cache: ContiguousKVCache, x: torch.Tensor, forward) -> torch.Tensor:
        """forward(x); a decode step through the backend's step graphs held in attribute `graphs` (made at
        the first decode step: None not yet, False the backend has none), which may replay it."""
        step = cache.decode_attention()
        if step is not None and self.capture_decode:
            if getattr(self, graphs) is None:
                setattr(self, graphs, self.ops.step_graphs() or False)
            if getattr(self, graphs):
                return getattr(self, graphs)(cache, x, step, forward)
        return forward(x)

    def decoder(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """The decoder layers and the final norm over the embeddings x."""
        for layer in self.model.layers:
            x = layer(x, positions, cache)
        return self.model.norm(x)

    # Whether decode steps may go through the backend's step graphs (EngineConfig.capture_decode); the
    # graphs themselves are made at the first decode step (None: not yet, False: the backend has none).
    capture_decode: bool = True
    _step_graphs = None

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Hidden states -> logits over the vocabulary: float32, or (float32=False) in the model's dtype,
        for a caller that converts only where it needs to (sample_batch)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    @property
    def num_cache_layers(self) -> int:
        """Layers the KV cache holds: the decoder's, and a draft module's where the model carries one."""
        return self.config.num_hidden_layers + (1 if getattr(self, "mtp", None) is not None else 0)

    def cache_entry_shapes(self) -> list[tuple[int, ...]]:
        """Per-token, per-layer shapes of what the KV cache stores."""
        raise NotImplementedError

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> ContiguousKVCache:
        return ContiguousKVCache(
            self.config.num_hidden_layers, batch_size, max_len, self.cache_entry_shapes(), dtype, device, self.ops
        )

    # ---- loading --------------------------------------------------------------------------
    def ignore_weight(self, name: str) -> bool:
        """Checkpoint tensors that exist but that this model does not use."""
        if "rotary_emb.inv_freq" in name:
            return True
        if self.skip_weight is not None and self.skip_weight(name):
            return True
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return True
        return False

    def expert_weight(self, name: str) -> tuple[str, int, str] | None:
        """For MoE families: map a per-expert checkpoint name to (module name, expert index, shard)."""
        return None

    def canonical_name(self, name: str) -> str:
        """A checkpoint tensor's name as this model's modules spell it (checkpoint_renames applied)."""
        if not self.checkpoint_renames:
            return name
        dotted = f".{name}"
        for fragment, module_fragment in self.checkpoint_renames:
            dotted = dotted.replace(fragment, module_fragment)
        return dotted[1:]

    def checkpoint_spelling(self, name: str) -> str:
        """canonical_name's inverse: how the checkpoint spells a name of this model's, for messages."""
        dotted = f".{name}"
        for fragment, module_fragment in reversed(self.checkpoint_renames):
            dotted = dotted.replace(module_fragment, fragment)
        return dotted[1:]

    def expected_checkpoint_names(self) -> set[str]:
        """Every checkpoint tensor name this model needs, to report exactly which ones are missing."""
        names: set[str] = set()
        modules = dict(self.named_modules())
        for pname, _ in self.named_parameters():
            module_name, _, attr = pname.rpartition(".")
            module = modules[module_name]
            if hasattr(module, "checkpoint_names"):
                names.update(module.checkpoint_names(module_name, attr))
                continue
            dotted = f".{pname}"
            parts = [dotted.replace(merged, fragment)[1:] for fragment, merged, _ in self.merged_weights if merged in dotted]
            names.update(parts or [pname])
        return names

    def weight_destination(self, name: str) -> tuple[str, str, str | None, int | None]:
        """Where checkpoint tensor `name` loads: (module name, attribute, merged shard or None, expert or None)."""
        name = self.canonical_name(name)
        expert = self.expert_weight(name)
        if expert is not None:
            module_name, index, shard = expert
            return module_name, "weight", shard, index
        dotted = f".{name}"
        for fragment, merged, shard in self.merged_weights:
            if fragment in dotted:
                module_name, _, attr = dotted.replace(fragment, merged)[1:].rpartition(".")
                return module_name, attr, shard, None
        module_name, _, attr = name.rpartition(".")
        return module_name, attr, None, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into this model; raise WeightError if any is missing or misshapen.

        A tensor may also arrive as a quantized weight (shoal.quant.formats): a layer that stores that
        format keeps it, any other converts it (see `copy_weight`).
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        seen: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if self.ignore_weight(name):
                continue
            name = self.canonical_name(name)
            module_name, attr, shard, expert = self.weight_destination(name)
            module = modules.get(module_name)
            if expert is not None and module is not None:
                module.load_expert(expert, shard, tensor, name)
            elif shard is not None and hasattr(module, "load_shard"):
                module.load_shard(attr, shard, tensor, name)
            elif shard is None and expert is None and hasattr(module, "load_weight"):
                module.load_weight(attr, tensor, name)  # a layer that stores its weight its own way
            elif shard is None and expert is None and name in params:
                copy_weight(params[name], tensor, name)
            else:
                unexpected.append(name)
                continue
            seen.add(name)
        missing = sorted(self.checkpoint_spelling(n) for n in self.expected_checkpoint_names() - seen)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightError(
                f"the checkpoint lacks {len(missing)} weight(s) the model needs: {', '.join(missing[:5])}{more}; "
                "the files are incomplete or belong to a different model"
            )
        if unexpected:
            log.warning("ignored %d checkpoint tensor(s) this model does not use, e.g. %s", len(unexpected), unexpected[0])
