"""How a model is divided: layers over pipeline stages and experts over expert-parallel ranks, evenly,
by an explicit split, or in proportion to each device's measured throughput; and the checks that a
split fits the model (tp must divide the heads, a stage needs a layer, a rank needs an expert)."""

from __future__ import annotations

from shoal.errors import ConfigError
from shoal.models.hf_config import ModelConfig
from shoal.parallel.config import ParallelConfig


def proportional_split(total: int, weights: list[float], minimum: int = 1) -> list[int]:
    """`total` items in parts proportional to `weights`, each at least `minimum` (largest remainder)."""
    n = len(weights)
    if total < minimum * n:
        raise ConfigError(f"cannot split {total} items over {n} ranks with at least {minimum} each")
    spare = total - minimum * n
    scale = sum(weights)
    exact = [spare * w / scale for w in weights]
    parts = [int(e) for e in exact]
    # Hand out what rounding left by largest remainder, ties to the earlier rank.
    order = sorted(range(n), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: spare - sum(parts)]:
        parts[i] += 1
    return [p + minimum for p in parts]


def ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """[3, 5] -> [(0, 3), (3, 8)]."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def layer_split(config: ModelConfig, parallel: ParallelConfig, speeds: list[float] | None = None) -> list[int]:
    """Decoder layers per pipeline stage."""
    layers = config.num_hidden_layers
    if parallel.pp > layers:
        raise ConfigError(f"--pp {parallel.pp} needs at least one layer per stage, but the model has {layers}")
    if isinstance(parallel.pp_layers, list):
        if sum(parallel.pp_layers) != layers:
            raise ConfigError(
                f"--pp-layers {','.join(map(str, parallel.pp_layers))} adds up to {sum(parallel.pp_layers)} "
                f"but the model has {layers} layers"
            )
        return list(parallel.pp_layers)
    weights = speeds if parallel.pp_layers == "auto" and speeds else [1.0] * parallel.pp
    return proportional_split(layers, weights)


def expert_split(num_experts: int, parallel: ParallelConfig, speeds: list[float] | None = None) -> list[int]:
    """Routed experts per expert-parallel rank (contiguous ranges, rank order)."""
    if parallel.ep > num_experts:
        raise ConfigError(f"--ep {parallel.ep} needs at least one expert per rank, but the model has {num_experts}")
    if isinstance(parallel.ep_weights, list):
        weights = parallel.ep_weights
    elif parallel.ep_weights == "auto" and speeds:
        weights = speeds
    else:
        weights = [1.0] * parallel.ep
    return proportional_split(num_experts, weights)


def check_tensor_split(config: ModelConfig, tp: int, quant: str | None = None, group_size: int = 0) -> None:
    """tp must divide every dimension the tensor split cuts; say which one does not. Under `quant`
    ("int4" / "fp8"), each rank's share must also hold whole int4 groups (of `group_size` inputs) or
    whole 128 x 128 fp8 blocks."""
    if tp == 1:
        return
    checks = [("attention heads (num_attention_heads)", config.num_attention_heads)]
    if not config.get("kv_lora_rank"):
        checks.append(("key/value heads (num_key_value_heads)", config.num_key_value_heads))
    checks.append(("intermediate_size", config.intermediate_size))
    if config.moe is not None:
        checks.append(("experts' intermediate size", config.moe.intermediate_size))
        if config.moe.shared_intermediate_size:
            checks.append(("shared experts' intermediate size", config.moe.shared_intermediate_size))
    for what, value in checks:
        if value % tp:
            raise ConfigError(f"--tp {tp} must divide the model's {what} ({value}); choose a tp that divides it")
    if quant in ("int4", "fp8"):
        _check_quantized_split(config, tp, quant, group_size)


def _check_quantized_split(config: ModelConfig, tp: int, quant: str, group_size: int) -> None:
    heads = config.num_attention_heads
    mla = bool(config.get("kv_lora_rank"))
    moe = config.moe.intermediate_size if config.moe is not None else 0
    shared = config.moe.shared_intermediate_size if config.moe is not None else 0
    # Inputs cut by a row split (o_proj, down projections): int4 groups and fp8 blocks run along them.
    inputs = [("attention output (o_proj inputs)",
               heads * (int(config.get("v_head_dim")) if mla else config.head_dim)),
              ("intermediate_size", config.intermediate_size)]
    if moe:
        inputs.append(("experts' intermediate size", moe))
    if shared:
        inputs.append(("shared experts' intermediate size", shared))
    # Outputs cut by a column split: fp8 blocks also span 128 rows.
    outputs = []
    if quant == "fp8":
        if mla:
            outputs.append(("query heads (q_b_proj outputs)",
                            heads * (int(config.get("qk_nope_head_dim")) + int(config.get("qk_rope_head_dim")))))
        else:
            outputs += [("query heads (q_proj outputs)", heads * config.head_dim),
                        ("key/value heads (k_proj / v_proj outputs)", config.num_key_value_heads * config.head_dim)]
        outputs += [(what, value) for what, value in inputs[1:]]  # gate/up outputs = down inputs
    unit = group_size if quant == "int4" else 128
    for what, value in inputs + outputs:
        if (value // tp) % unit:
            if quant == "int4":
                fits = [g for g in (32, 64, 128) if (value // tp) % g == 0]
                hint = f"use --group-size {fits[-1]}" if fits else "use a smaller --tp or --quant int8"
                raise ConfigError(
                    f"--tp {tp} with --quant int4 --group-size {group_size}: each rank gets {value // tp} of the "
                    f"model's {what} ({value}), which is not a whole number of groups; {hint}"
                )
            raise ConfigError(
                f"--tp {tp} with --quant fp8: each rank gets {value // tp} of the model's {what} ({value}), which "
                "is not a whole number of 128 x 128 fp8 blocks; use a smaller --tp or --quant int8"
            )


def check_expert_split(config: ModelConfig, ep: int) -> None:
    if ep > 1 and config.moe is None:
        raise ConfigError(f"--ep {ep} splits routed experts, but {config.architecture} has none; use --tp or --pp")
