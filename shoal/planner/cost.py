"""The cost model: how long a prefill and a decode step take for one deployment, and whether it fits.

Each piece of a forward pass (attention projections, attention over the cache, dense MLP, shared and
routed experts, LM head) is placed on the chips of a layout and timed on its own roofline —
max(FLOPs / (peak x compute efficiency), bytes / (bandwidth x memory efficiency)) — then the
collectives each layout needs (tensor-parallel all-reduce, expert dispatch and combine, pipeline
sends) are timed over the link they cross. With two-microbatch overlap communication hides behind
compute, otherwise it adds to it. Efficiency factors are inputs: fitted by `validate.py` on published
deployments, or by `calibrate.py` on a machine shoal runs on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shoal.planner.catalog import Chip
from shoal.planner.errors import PlanError
from shoal.planner.shapes import LOW_PRECISION_COMPUTE, ModelShape, kv_bytes, unquantized_bytes, weight_bytes

# Fixed start-up latency of one collective (estimates: NVLink/UB-class fabrics, IB/RoCE-class networks).
SCALEUP_LATENCY_S = 5e-6
SCALEOUT_LATENCY_S = 15e-6
# Activation memory per token in flight, in units of hidden x 2 bytes (residual, norms, projections,
# dispatch buffers): an estimate, only used to refuse layouts that clearly cannot hold their batch.
ACTIVATION_HIDDENS = 24


@dataclass
class Factors:
    """How close a chip gets to its datasheet; every figure a fraction of peak unless it says otherwise."""

    prefill_compute: float = 0.5  # (with matmul_half_tokens > 0: every matmul's, at many rows)
    decode_compute: float = 0.5
    memory: float = 0.8
    link: float = 0.7
    overlap: float = 0.5  # share of the shorter of compute and communication hidden under the other
    layer_overhead_us: float = 0.0  # fixed cost per layer per forward step (kernel launches, syncs, host code)
    step_overhead_us: float = 0.0  # fixed cost per forward step
    # Fixed cost per routed expert that receives tokens, per MoE layer per forward step: its own gather,
    # matmul launches and scatter. Per phase: in prefill an expert's token count is new almost every
    # step, and a CPU matmul library prepares its kernels afresh for each new count.
    prefill_expert_us: float = 0.0
    decode_expert_us: float = 0.0
    # Fixed cost per MoE layer per forward step when the experts are spread over chips (ep > 1), beyond
    # the dispatch and combine themselves (those pay the stack's published latency plus their bytes over
    # the link, see Chip.ep_dispatch_latency_us): routing, permutation, grouped-GEMM launches, waiting
    # for the slowest rank. Fitted; not yet tied to a published figure.
    ep_layer_us: float = 0.0
    # Share of the dense matmuls' efficiency that grouped routed-expert matmuls reach.
    expert_efficiency: float = 1.0
    # When > 0, a matmul's efficiency follows its rows instead of its phase: prefill_compute x
    # m / (m + matmul_half_tokens) for m rows on the chip (tokens of a data-parallel group; for a
    # routed expert, the tokens it receives), so small decode batches and thinly spread experts
    # reach less of peak; decode_compute is then unused.
    matmul_half_tokens: float = 0.0
    # Passes over a token's hidden-size activation per layer made by the ops between the matmuls (norms,
    # residual adds, rotary, the gated activation, cache writes), each a read or a write at the memory
    # roofline; 0 where kernels are fused or the matmuls hide them.
    activation_passes: float = 0.0
    # Share of the bf16 peak the attention kernels reach on the scores and weighted sums (flash / MLA
    # kernels are tuned apart from the GEMMs, and at long context they are most of a decode step);
    # 0: the matmuls' efficiency.
    attention_compute: float = 0.0

    def replaced(self, **changes: float) -> "Factors":
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if k in values})
        return Factors(**values)


@dataclass(frozen=True)
class Layout:
    """How one serving instance splits the model: `chips` = tp x dp x pp; experts spread over the
    chips of a pipeline stage, ep ways (each expert then split chips/pp/ep ways)."""

    chips: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    redundant_experts: int = 0

    @property
    def dp(self) -> int:
        return self.chips // (self.tp * self.pp)

    @property
    def stage_chips(self) -> int:
        return self.chips // self.pp

    def describe(self) -> str:
        parts = [f"{self.chips} chips", f"tp{self.tp}", f"dp{self.dp}"]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        return " ".join(parts)


@dataclass
class Deployment:
    """One serving instance: a chip kind, a layout, and how the model is stored and run on it."""

    chip: Chip
    layout: Layout
    quant: str = "bf16"
    kv_dtype: str = "bf16"
    mtp_tokens: int = 0  # draft tokens proposed per step by multi-token prediction (0: off)
    mtp_acceptance: float = 0.0  # probability each draft token is accepted
    expert_imbalance: float = 1.0  # busiest chip's routed-expert load over the mean
    overlap: bool = True  # two-microbatch overlap of communication with compute
    memory_util: float = 0.9  # fraction of chip memory shoal may plan to fill
    # How the decode attention kernel reads a grouped-query (GQA) cache: "per_kv_head", each cached key and
    # value read once for its group of query heads (GQA-aware kernels: FlashAttention, FlashInfer,
    # TensorRT-LLM's XQA from v0.8), or "per_query_head", read again for every query head of the group
    # (the generic masked multi-head kernels before those: heads / kv_heads times the bytes).
    kv_reads: str = "per_kv_head"
    # The routed experts this chip holds over an even share of them: 1.0 for an even split; above or below
    # it where experts are split by speed over unequal chips (the engine's --ep-weights auto), so that a
    # faster chip holds, reads and computes more of them.
    expert_share: float = 1.0

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens each sequence gains per decode step (1 + a + a^2 + ... over the draft tokens)."""
        return sum(self.mtp_acceptance ** i for i in range(self.mtp_tokens + 1))

    @property
    def compute(self) -> str:
        low = LOW_PRECISION_COMPUTE.get(self.quant)
        return low if low and self.chip.has_compute(low) else "bf16"


def check_layout(shape: ModelShape, layout: Layout) -> None:
    """Refuse a layout that does not divide the model, with the reason."""
    for name in ("chips", "tp", "ep", "pp"):
        if getattr(layout, name) < 1:
            raise PlanError(f"{name} must be >= 1, got {getattr(layout, name)}")
    if layout.chips % (layout.tp * layout.pp):
        raise PlanError(f"{layout.chips} chips cannot be split into tp={layout.tp} x pp={layout.pp}; "
                        "chips must be a multiple of tp x pp")
    if shape.heads % layout.tp:
        raise PlanError(f"tp={layout.tp} does not divide the model's {shape.heads} attention heads")
    if not shape.mla and layout.tp > shape.kv_heads and layout.tp % shape.kv_heads:
        raise PlanError(f"tp={layout.tp} neither divides nor is a multiple of the model's {shape.kv_heads} KV heads")
    if layout.pp > shape.layers:
        raise PlanError(f"pp={layout.pp} exceeds the model's {shape.layers} layers")
    if layout.ep > 1 or layout.redundant_experts:
        if not shape.routed_experts:
            raise PlanError(f"ep={layout.ep}: {shape.name} has no routed experts; use ep=1")
        slots = shape.routed_experts + layout.redundant_experts
        if slots % layout.ep:
            extra = f" + {layout.redundant_experts} redundant" if layout.redundant_experts else ""
            raise PlanError(f"ep={layout.ep} does not divide the model's {shape.routed_experts}{extra} experts")
        if layout.stage_chips % layout.ep:
            raise PlanError(f"ep={layout.ep} does not divide the {layout.stage_chips} chips of a pipeline stage")
    if shape.routed_experts and layout.stage_chips // layout.ep > layout.tp:
        raise PlanError(f"with ep={layout.ep} each expert would be split over {layout.stage_chips // layout.ep} chips, "
                        f"more than tp={layout.tp}; use ep={layout.stage_chips // layout.tp} (or a larger tp)")


@dataclass
class StepCost:
    """Seconds of one forward pass on one chip of one pipeline stage, by piece."""

    compute_s: float = 0.0  # roofline time of all pieces (each max of its FLOPs and bytes time)
    comm_s: float = 0.0
    overhead_s: float = 0.0
    overlap: float = 0.5  # share of the shorter of compute and communication that is hidden (0: none)
    pieces: dict[str, float] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)
    bound: dict[str, str] = field(default_factory=dict)  # piece -> "compute" or "memory"

    @property
    def total_s(self) -> float:
        hidden = self.overlap * min(self.compute_s, self.comm_s)
        return self.compute_s + self.comm_s - hidden + self.overhead_s


def _roofline(cost: StepCost, name: str, flops: float, nbytes: float, peak_tflops: float, bandwidth_gbps: float,
              compute_eff: float, memory_eff: float, repeat: float) -> None:
    t_compute = flops / (peak_tflops * 1e12 * compute_eff)
    t_memory = nbytes / (bandwidth_gbps * 1e9 * memory_eff)
    seconds = max(t_compute, t_memory) * repeat
    cost.pieces[name] = cost.pieces.get(name, 0.0) + seconds
    cost.bound[name] = "compute" if t_compute >= t_memory else "memory"
    cost.compute_s += seconds


def all_to_all_copies(chip: Chip, group: int, phase: str, topk: int) -> tuple[float, float | None]:
    """Copies of a token one chip sends in an expert dispatch over a group of `group` chips, and the
    share of them that cross the network (None: spread evenly over the group).

    Decode (latency-mode kernels) sends one copy per remote expert. Prefill (throughput-mode
    kernels, as DeepEP's normal mode) sends a token once per remote scale-up domain and fans it out
    inside that domain, so only the distinct remote domains it hits cross the network."""
    remote = topk * (group - 1) / group
    if phase != "prefill" or group <= chip.scaleup_domain:
        return remote, None
    domains = group / chip.scaleup_domain
    across = (domains - 1) * (1 - (1 - 1 / domains) ** topk)
    inside = topk * (chip.scaleup_domain - 1) / group
    return across + inside, across / (across + inside)


def _link_time(chip: Chip, factors: Factors, group: int, nbytes_remote: float,
               share_out: float | None = None, latency_us: float | None = None) -> float:
    """Seconds to move `nbytes_remote` from one chip to the other members of a group of `group` chips
    (spread evenly unless `share_out` says which share crosses the network): the part inside the
    scale-up domain and the part across the network run at once, after the collective's fixed latency
    (`latency_us`, else the fabric's start-up latency)."""
    if group <= 1 or nbytes_remote <= 0:
        return 0.0
    inside = min(group, chip.scaleup_domain)
    share_in = (inside - 1) / (group - 1) if share_out is None else 1 - share_out
    t_in = nbytes_remote * share_in / (chip.scaleup_gbps * 1e9 * factors.link)
    t_out = nbytes_remote * (1 - share_in) / (chip.scaleout_gbps * 1e9 * factors.link)
    if latency_us is not None:
        return max(t_in, t_out) + latency_us * 1e-6
    return max(t_in, t_out) + (SCALEOUT_LATENCY_S if group > chip.scaleup_domain else SCALEUP_LATENCY_S)


def forward_cost(shape: ModelShape, dep: Deployment, factors: Factors, tokens: float, keys: float,
                 kv_read_tokens: float, logits_tokens: float, phase: str, prefill_tokens: float = 0.0,
                 prefill_keys: float = 0.0, prefill_chunk: float = 0.0) -> StepCost:
    """One forward pass of one pipeline stage, on one chip, for the whole instance's batch.

    tokens: tokens processed across the instance (all DP groups); keys: query-key pairs attended
    (sum over tokens of keys seen); kv_read_tokens: cached tokens read from memory (decode); logits_tokens:
    tokens that need the LM head; phase: "prefill", "decode" or "mixed" (a chunked-prefill step: of
    `tokens`, `prefill_tokens` are prompt tokens and of `keys`, `prefill_keys` are theirs; the matmuls
    run at the two phases' efficiencies weighted by their share of the tokens; `prefill_chunk`: the
    tokens of one prompt's chunk — with attention data-parallel groups (dp > 1) a chunk runs on one
    group, so the busiest group carries at least one whole chunk, and the step waits for it at the
    next collective: its attention and dense parts are timed for the busiest group, not the mean)."""
    chip, lay = dep.chip, dep.layout
    share = 1.0 if phase == "prefill" else 0.0
    if phase == "mixed":
        share = min(1.0, prefill_tokens / tokens) if tokens > 0 else 0.0
        prefill_keys = min(prefill_keys, keys)
    else:
        prefill_keys = keys if phase == "prefill" else 0.0
    # a decode step's matmuls (few rows) reach at most the share of peak a prefill's (many rows) do; a
    # memory-bound decode leaves decode_compute unmeasured, and it must not speed up a chunked step
    compute_eff = share * factors.prefill_compute + (1 - share) * min(factors.decode_compute, factors.prefill_compute)
    wb = weight_bytes(dep.quant)
    peak = chip.matmul_tflops(dep.compute)
    bf16 = chip.bf16_tflops
    bw = chip.memory_bw_gbps
    dp, tp, pp = lay.dp, lay.tp, lay.pp
    stage_layers = shape.layers / pp
    dense_layers = shape.dense_layers / pp
    moe_layers = shape.moe_layers / pp
    cost = StepCost(overlap=factors.overlap if dep.overlap else 0.0)
    t_dp = tokens / dp  # tokens of one attention data-parallel group (the busiest one)
    if phase == "mixed" and dp > 1 and prefill_tokens > 0 and prefill_chunk > 0:
        busiest = max(prefill_tokens / dp, min(prefill_tokens, prefill_chunk))
        t_dp = (tokens - prefill_tokens) / dp + busiest
        scaled = prefill_keys * busiest / (prefill_tokens / dp)  # core_flops below is per mean group (/ dp)
        keys, prefill_keys = keys + scaled - prefill_keys, scaled
    kv_split = 1 if shape.mla else min(tp, shape.kv_heads)

    half = factors.matmul_half_tokens

    def eff(rows: float) -> float:
        return factors.prefill_compute * rows / (rows + half) if half > 0 and rows > 0 else compute_eff

    def roof(name, flops, nbytes, peak_tflops, repeat, rows=None):
        _roofline(cost, name, flops, nbytes, peak_tflops, bw, eff(t_dp if rows is None else rows), factors.memory,
                  repeat)

    roof("attention projections", t_dp * 2 * shape.attention_params / tp, shape.attention_params * wb / tp, peak,
         stage_layers)
    kv_layer_bytes = shape.kv_values_per_token_layer * kv_bytes(dep.kv_dtype)
    if dep.kv_reads == "per_query_head" and not shape.mla:
        kv_layer_bytes *= shape.heads / shape.kv_heads
    core_flops = (prefill_keys * shape.attention_core_flops_per_key(absorbed=False)
                  + (keys - prefill_keys) * shape.attention_core_flops_per_key(absorbed=True))
    _roofline(cost, "attention core", core_flops / dp / tp, kv_read_tokens / dp * kv_layer_bytes / kv_split, bf16, bw,
              factors.attention_compute or eff(t_dp), factors.memory, stage_layers)
    if dense_layers:
        roof("dense MLP", t_dp * 2 * shape.dense_mlp_params / tp, shape.dense_mlp_params * wb / tp, peak,
             dense_layers)
    if moe_layers:
        shared = shape.shared_experts * shape.expert_params
        roof("shared experts + router", t_dp * 2 * (shared + shape.router_params) / tp,
             (shared * wb + shape.router_params * unquantized_bytes(dep.quant)) / tp, peak, moe_layers)
        slots = shape.routed_experts + lay.redundant_experts
        per_chip = slots / lay.ep
        expert_split = lay.stage_chips / lay.ep
        # Only experts that receive a token are read: each token picks k of E experts.
        touched = 1.0 - (1.0 - shape.experts_per_token / shape.routed_experts) ** max(tokens, 0.0)
        flops = (tokens * shape.experts_per_token * 2 * shape.expert_params / lay.stage_chips * dep.expert_imbalance
                 * dep.expert_share)
        # grouped expert matmuls (many small ones, each of a few tokens) reach a lower share of peak
        rows = tokens * shape.experts_per_token / shape.routed_experts  # tokens one expert receives
        _roofline(cost, "routed experts", flops,
                  per_chip * dep.expert_share * touched * shape.expert_params * wb / expert_split, peak,
                  bw, eff(rows) * factors.expert_efficiency, factors.memory, moe_layers)
        active_experts = moe_layers * per_chip * dep.expert_share * touched
    else:
        active_experts = 0.0
    if factors.activation_passes:
        roof("activations", 0.0, t_dp * factors.activation_passes * shape.hidden * 2.0 / tp, peak, stage_layers)
    head_tp = tp  # vocabulary-parallel head over the tensor-parallel group
    cost.pieces.setdefault("LM head", 0.0)
    _roofline(cost, "LM head", logits_tokens / dp * 2 * shape.head_params / head_tp,
              shape.head_params * unquantized_bytes(dep.quant) / head_tp, bf16, bw, eff(logits_tokens / dp),
              factors.memory, 1.0)

    # ---- communication ----
    act = 2.0  # bf16 activations
    if tp > 1:
        ring = 2 * (tp - 1) / tp * t_dp * shape.hidden * act
        per = _link_time(chip, factors, tp, ring * (tp - 1) / tp) if tp > 1 else 0.0
        cost.comm["tp all-reduce"] = 2 * stage_layers * per
    if moe_layers and lay.stage_chips > 1 and lay.ep > 1:
        per_chip_tokens = tokens / lay.stage_chips
        dispatch_bytes = 1.0 if dep.compute in ("fp8", "int8", "fp4") else act
        kernels = "prefill" if share > 0.5 else "decode"  # DeepEP-style normal or low-latency mode
        copies, share_out = all_to_all_copies(chip, lay.stage_chips, kernels, shape.experts_per_token)
        dispatch = per_chip_tokens * copies * shape.hidden * dispatch_bytes
        combine = per_chip_tokens * copies * shape.hidden * act
        cost.comm["ep dispatch"] = moe_layers * _link_time(chip, factors, lay.stage_chips, dispatch, share_out,
                                                           chip.ep_dispatch_latency_us)
        cost.comm["ep combine"] = moe_layers * _link_time(chip, factors, lay.stage_chips, combine, share_out,
                                                          chip.ep_combine_latency_us)
    if pp > 1:
        send = tokens / lay.stage_chips * shape.hidden * act
        cost.comm["pp send"] = _link_time(chip, factors, 2 if lay.chips <= chip.scaleup_domain else
                                          chip.scaleup_domain + 1, send)
    cost.comm_s = sum(cost.comm.values())
    expert_us = share * factors.prefill_expert_us + (1 - share) * factors.decode_expert_us
    ep_layers = moe_layers if lay.ep > 1 and lay.stage_chips > 1 else 0.0
    cost.overhead_s = (factors.layer_overhead_us * stage_layers + factors.step_overhead_us
                       + expert_us * active_experts + factors.ep_layer_us * ep_layers) * 1e-6
    return cost


def prefill_time(shape: ModelShape, dep: Deployment, factors: Factors, prompts: int, prompt_len: int,
                 cached: int = 0) -> tuple[float, StepCost]:
    """Seconds to prefill `prompts` prompts of `prompt_len` tokens on one instance (`cached` of each
    already in the prefix cache), and the cost of one stage's pass. With pp stages the batch runs as
    pp microbatches through the pipeline: (2pp - 1) stage passes of one microbatch each."""
    new = prompt_len - cached
    tokens = prompts * new
    keys = prompts * (prompt_len * (prompt_len + 1) / 2 - cached * (cached + 1) / 2)
    pp = dep.layout.pp
    stage = forward_cost(shape, dep, factors, tokens / pp, keys / pp, 0.0, prompts / pp, "prefill")
    return (2 * pp - 1) * stage.total_s, stage


def decode_step_time(shape: ModelShape, dep: Deployment, factors: Factors, seqs: int,
                     context: float) -> tuple[float, StepCost]:
    """Seconds between two decode steps of the same sequence with `seqs` sequences in flight on one
    instance at `context` cached tokens each; with pp stages they run as pp microbatches in turn."""
    pp = dep.layout.pp
    per_seq = 1 + dep.mtp_tokens  # the token plus its drafts are verified in one pass
    mb = seqs / pp
    tokens = mb * per_seq
    stage = forward_cost(shape, dep, factors, tokens, tokens * context, mb * context, tokens, "decode")
    total = stage.total_s
    if dep.mtp_tokens:  # the draft module: one more layer per draft token, on the last stage
        draft = forward_cost(shape, dep, factors, mb, mb * context, mb * context, mb, "decode")
        total += dep.mtp_tokens * draft.total_s * (shape.mtp_layers or 1) / (shape.layers / pp)
    return pp * total, stage


@dataclass
class Memory:
    """Bytes one chip must hold, and what it has."""

    weights: float
    kv: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def weights_per_chip(shape: ModelShape, dep: Deployment) -> float:
    lay = dep.layout
    wb = weight_bytes(dep.quant)
    stage = 1.0 / lay.pp
    total = shape.layers * stage * shape.attention_params * wb / lay.tp
    total += shape.dense_layers * stage * shape.dense_mlp_params * wb / lay.tp
    if shape.moe_layers:
        slots = shape.routed_experts + lay.redundant_experts
        routed = slots / lay.ep * dep.expert_share * shape.expert_params * wb / (lay.stage_chips / lay.ep)
        router = shape.router_params * unquantized_bytes(dep.quant)
        shared = (shape.shared_experts * shape.expert_params * wb + router) / lay.tp
        total += shape.moe_layers * stage * (routed + shared)
    embeddings = shape.embedding_params * unquantized_bytes(dep.quant) / lay.tp
    total += embeddings * (1 if shape.tied_embeddings or lay.pp > 1 else 2)
    if dep.mtp_tokens and shape.mtp_layers:
        total += shape.mtp_params * wb / lay.stage_chips
    return total


def memory_per_chip(shape: ModelShape, dep: Deployment, seqs: int, context: int, tokens_in_flight: float) -> Memory:
    """Weights, KV cache for `seqs` sequences of `context` tokens, and activations for `tokens_in_flight`."""
    lay = dep.layout
    kv_split = 1 if shape.mla else min(lay.tp, shape.kv_heads)
    kv = seqs / lay.dp * context * shape.kv_bytes_per_token(dep.kv_dtype) / lay.pp / kv_split
    activations = tokens_in_flight / lay.dp / lay.pp * shape.hidden * 2 * ACTIVATION_HIDDENS
    return Memory(weights_per_chip(shape, dep), kv, activations, dep.chip.memory_gb * 1e9 * dep.memory_util)


def max_decode_seqs(shape: ModelShape, dep: Deployment, context: int) -> int:
    """The most sequences of `context` tokens one instance can hold in memory (0 if even the weights do not fit)."""
    base = memory_per_chip(shape, dep, 0, context, 0)
    free = base.capacity - base.weights
    if free <= 0:
        return 0
    one = memory_per_chip(shape, dep, 1, context, 1 + dep.mtp_tokens)
    per_seq = one.total - base.total
    return max(0, int(free / per_seq)) if per_seq > 0 else 1 << 20


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))
