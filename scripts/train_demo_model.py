"""Train the tiny demo model bundled in ``shoal/demo_model``.

What it is: a DeepSeek-V3-style causal LM (Multi-head Latent Attention + a
Mixture-of-Experts FFN with a shared expert and group-limited sigmoid routing,
first layer dense), built with Hugging Face ``transformers``'
``DeepseekV3Config`` / ``DeepseekV3ForCausalLM``, with a few million
parameters and a 4096-entry byte-level BPE tokenizer trained here.

What it was trained on: only text that ships with CPython itself (PSF
licence): the ``pydoc_data.topics`` help texts and the module / class /
function docstrings of the standard library's ``.py`` files (test suites,
IDLE, turtledemo and a few other noisy folders skipped), deduplicated. The
last 2% of documents are held out to report a validation loss (written to
/tmp only, never shipped).

It carries one multi-token-prediction (MTP) module as DeepSeek-V3 lays it out
(``model.layers.{num_hidden_layers}``: ``enorm``, ``hnorm``, ``eh_proj``, a
decoder block and ``shared_head.norm``; the embedding and output head are the
main model's, as in the paper), trained with the paper's MTP loss at weight
``--mtp-weight``, so that speculative decoding (``--speculative mtp``) has a
real draft to measure. The shipped head was then distilled on the frozen model
(``--mtp-from shoal/demo_model --mtp-distill``: it learns the main head's own
next-token distribution, which is what speculative decoding accepts; 0.51 ->
0.71 of first drafts accepted in greedy generation). transformers' DeepseekV3 runs only the first
``num_hidden_layers`` layers, so the checkpoint still loads there unchanged.

This is a DEMO, not a useful model. It exists so that ``shoal generate`` /
``shoal chat`` can print English-looking text about Python on a machine with
no network, and so that tests have a real MLA + MoE checkpoint to load. It
knows nothing, follows no instructions and will happily invent nonsense.

Usage (about 20 minutes on one CPU core)::

    python scripts/train_demo_model.py --out shoal/demo_model --minutes 20

The run is deterministic for a given seed, step count and machine (the time
budget can cut it short at a different step on a slower machine).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 4096
SKIP_DIRS = {
    "test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "tkinter",
    "distutils", "site-packages", "dist-packages", "pydoc_data", "__pycache__",
    "__phello__", "venv",
}
# Files whose docstrings are mostly grammar notation (RFC 5322 BNF) or codec
# tables: they teach the model "[CFWS] [CFWS] ..." rather than English.
SKIP_FILES = {"_header_value_parser.py", "_parseaddr.py"}
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


# --------------------------------------------------------------------------- data
def stdlib_documents() -> list[str]:
    """pydoc topics + stdlib docstrings, deduplicated, in a fixed order."""
    from pydoc_data.topics import topics

    docs: list[str] = [topics[k].strip() for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_") or name in SKIP_FILES:
                continue
            try:
                tree = ast.parse(Path(root, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40 and "generated from 'MAPPINGS" not in doc:
                        docs.append(doc.strip())
    seen: set[str] = set()
    out = []
    for d in docs:
        h = hashlib.sha1(d.encode()).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    # Prepend <|bos|> on encode (what add_bos_token promises); byte-level offsets kept.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]),
    ])
    return tok


def encode_docs(tok, docs: list[str]) -> torch.Tensor:
    """One long stream: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ..."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs):  # post-processor adds <|bos|>
        ids.extend(enc.ids)
        ids.append(1)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model
def build_config(args):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_nextn_predict_layers=1,  # the MTP module, layer num_hidden_layers of the checkpoint
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        attention_bias=False,
        use_cache=True,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


class RouterBalancer:
    """DeepSeek-V3's auxiliary-loss-free load balancing.

    Counts how many tokens each routed expert receives in a step and nudges the
    router's ``e_score_correction_bias`` (used only to *choose* experts, not to
    weight them) up for under-loaded experts and down for over-loaded ones.
    """

    def __init__(self, model, rate: float):
        self.rate = rate
        self.gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.counts = [torch.zeros(g.num_experts) for g in self.gates]
        for i, g in enumerate(self.gates):
            g.register_forward_hook(self._hook(i))
        self.enabled = True

    def _hook(self, i):
        def hook(module, inputs, output):
            if self.enabled and module.training:
                idx = output[2]
                self.counts[i] += torch.bincount(idx.flatten(), minlength=module.num_experts).float()
        return hook

    @torch.no_grad()
    def step(self) -> float:
        """Update biases; return the worst max/mean load ratio seen this step."""
        worst = 0.0
        for g, c in zip(self.gates, self.counts):
            if c.sum() == 0:
                continue
            mean = c.mean()
            g.e_score_correction_bias += self.rate * torch.sign(mean - c)
            worst = max(worst, float(c.max() / mean))
            c.zero_()
        return worst


class MultiTokenPredictor(torch.nn.Module):
    """DeepSeek-V3's MTP module, depth 1: from the main model's final hidden state at position i and the
    embedding of token i+1, predict token i+2. Laid out as vLLM's DeepSeekMultiTokenPredictorLayer
    reads it (embedding first in the concatenation); the block is transformers' own decoder layer."""

    def __init__(self, cfg):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

        super().__init__()
        index = cfg.num_hidden_layers
        # The block's weights are named as layer `index` of the checkpoint; the extra modules hang on it.
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx=index)
        self.block.enorm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block.hnorm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block.eh_proj = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block.shared_head = torch.nn.Module()
        self.block.shared_head.norm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, model, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """hidden [b, t, h] (final, normed) at positions 0..t-1, next_ids [b, t] the tokens at 1..t ->
        logits [b, t, vocab] for the tokens at 2..t+1."""
        from transformers.masking_utils import create_causal_mask

        block, inner = self.block, model.model
        x = block.eh_proj(torch.cat([block.enorm(inner.embed_tokens(next_ids)), block.hnorm(hidden)], dim=-1))
        positions = torch.arange(x.shape[1])[None]
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=positions)
        x = block(x, attention_mask=mask, position_ids=positions, position_embeddings=inner.rotary_emb(x, positions))
        return model.lm_head(block.shared_head.norm(x))


def forward_losses(model, mtp, x: torch.Tensor, y: torch.Tensor, main_loss: bool = True, distill: bool = False):
    """(main next-token loss, MTP loss for the token after next) over inputs x and targets y = x shifted;
    main_loss=False (the main model frozen, see --mtp-from) skips the main head and its gradients.
    distill: the MTP head learns the main model's own next-token distribution at that position (soft
    cross-entropy) instead of the text's token: a draft is accepted when it agrees with the model, not
    with the text (--mtp-distill)."""
    ce = torch.nn.functional.cross_entropy
    with torch.set_grad_enabled(torch.is_grad_enabled() and main_loss):
        hidden = model.model(input_ids=x).last_hidden_state
    main = None
    if main_loss:
        logits = model.lm_head(hidden)
        main = ce(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    # Position i sees hidden_i and token i+1 (= y_i) and predicts token i+2 (= y_{i+1}).
    mtp_logits = mtp(model, hidden[:, :-1], y[:, :-1]).float().reshape(-1, model.config.vocab_size)
    if distill:
        with torch.no_grad():
            teacher = model.lm_head(hidden[:, 1:]).float().softmax(-1).reshape(-1, model.config.vocab_size)
        return main, ce(mtp_logits, teacher)
    return main, ce(mtp_logits, y[:, 1:].reshape(-1))


@torch.no_grad()
def mtp_agreement(model, mtp, x: torch.Tensor) -> float:
    """The share of positions where the MTP head's first choice for token i + 2 is the main model's own
    first choice there: the acceptance of a greedy one-token draft on this text (teacher-forced)."""
    hidden = model.model(input_ids=x).last_hidden_state
    drafted = mtp(model, hidden[:, :-1], x[:, 1:]).argmax(-1)
    return float((drafted == model.lm_head(hidden[:, 1:]).argmax(-1)).float().mean())


# --------------------------------------------------------------------------- train
def batches(stream: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    n = stream.numel() - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, mtp, stream: torch.Tensor, seq: int, batch: int, autocast) -> tuple[float, float | None]:
    """Validation loss of the main head, and of the MTP head against the text (None without one)."""
    model.eval()
    n = (stream.numel() - 1) // seq
    main, extra = [], []
    for i in range(0, n, batch):
        rows = range(i, min(i + batch, n))
        x = torch.stack([stream[r * seq : r * seq + seq + 1] for r in rows])
        with autocast():
            if mtp is None:
                logits = model(input_ids=x[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            else:
                loss, loss_mtp = forward_losses(model, mtp, x[:, :-1], x[:, 1:])
                extra.append(loss_mtp.item() * len(rows))
        main.append(loss.item() * len(rows))
    model.train()
    return sum(main) / n, (sum(extra) / n if extra else None)


def previous_model_loss(out: Path, val_docs: list[str], seq: int, batch: int, autocast) -> float | None:
    """The main head's validation loss of the model already in `out` (with its own tokenizer), so a
    retrained model replaces it only when it is no worse; None where there is none."""
    from tokenizers import Tokenizer
    from transformers import DeepseekV3ForCausalLM

    if not (out / "model.safetensors").exists() or not (out / "tokenizer.json").exists():
        return None
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32)
    return evaluate(model, None, encode_docs(tok, val_docs), seq, batch, autocast)[0]


def warm_start_mtp(mtp, folder: Path, index: int) -> None:
    """Load the MTP layer (checkpoint layer `index`) already saved in `folder` into `mtp`, where it has one."""
    from safetensors.torch import load_file

    prefix = f"model.layers.{index}."
    saved = {k[len(prefix):]: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
             if k.startswith(prefix)}
    if not saved:
        print(f"{folder} holds no MTP layer: the MTP head starts from scratch", flush=True)
        return
    # The checkpoint names each expert (as save_pretrained writes them); the module stacks them.
    experts = sorted({int(k.split(".")[2]) for k in saved if k.startswith("mlp.experts.")})
    if experts:
        e = "mlp.experts.{}.{}_proj.weight"
        saved["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([saved.pop(e.format(i, "gate")), saved.pop(e.format(i, "up"))]) for i in experts])
        saved["mlp.experts.down_proj"] = torch.stack([saved.pop(e.format(i, "down")) for i in experts])
    missing, unexpected = mtp.block.load_state_dict(saved, strict=False)
    print(f"MTP head warm-started from {folder} ({len(saved)} tensors; missing {missing}, unexpected {unexpected})",
          flush=True)


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))


def save(model, tok, cfg, out: Path, args) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # start clean so no stale shard or index survives
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}):
            f.unlink()
    model = model.to(torch.bfloat16)
    # The real DeepSeek-V3 checkpoints keep the routing bias in fp32; so do we.
    for g in (m for n, m in model.named_modules() if n.endswith("mlp.gate")):
        g.e_score_correction_bias.data = g.e_score_correction_bias.data.float()
    model.config.torch_dtype = torch.bfloat16
    model.config.use_cache = True
    model.config._experts_implementation = None
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=False, max_new_tokens=64).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for f in out.iterdir():
        if f.is_file() and f.name not in keep and f.suffix != ".py":
            f.unlink()
    for f in out.iterdir():
        f.chmod(0o644)
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("architectures") == ["DeepseekV3ForCausalLM"], saved.get("architectures")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("shoal/demo_model"))
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for the training loop")
    ap.add_argument("--steps", type=int, default=800,
                    help="optimizer steps the cosine schedule spans (800 take ~17 min on one core here)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16",
                    help="autocast dtype for training (bf16 measured ~20%% faster than fp32 on one core here)")
    ap.add_argument("--experts-impl", default="grouped_mm",
                    help="transformers experts kernel for training (grouped_mm ~25%% faster than eager here)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mtp-weight", type=float, default=0.3,
                    help="weight of the MTP loss (DeepSeek-V3 uses 0.3 for most of training)")
    ap.add_argument("--mtp-from", type=Path, default=None,
                    help="train only the MTP module on top of the model (and tokenizer) in this folder, kept frozen: "
                         "its main head stays exactly as it was")
    ap.add_argument("--mtp-distill", action="store_true",
                    help="with --mtp-from: train the MTP head on the frozen model's own next-token distribution "
                         "(what speculative decoding accepts) instead of the text's tokens, starting from the MTP "
                         "layer already in that folder where it has one")
    ap.add_argument("--force", action="store_true",
                    help="save even when the main head's validation loss is worse than the model already in --out")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/shoal_demo_model"))
    args = ap.parse_args(argv)

    from tqdm import tqdm
    from transformers import DeepseekV3ForCausalLM

    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    docs = stdlib_documents()
    n_val = max(1, len(docs) // 50)  # last 2% held out
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    args.scratch.mkdir(parents=True, exist_ok=True)
    (args.scratch / "val.txt").write_text("\n\n".join(val_docs))
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.2f} MB chars; val {n_val} docs", flush=True)

    if args.mtp_from is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.mtp_from / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_docs)
    train_ids = encode_docs(tok, train_docs)
    val_ids = encode_docs(tok, val_docs)
    print(f"tokens: train {train_ids.numel():,}  val {val_ids.numel():,}  "
          f"({sum(map(len, train_docs)) / train_ids.numel():.2f} chars/token)  [{time.time() - t0:.0f}s]", flush=True)

    if args.dtype == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib
        autocast = contextlib.nullcontext
    previous = previous_model_loss(args.out, val_docs, args.seq, args.batch * 2, autocast)
    if previous is not None:
        print(f"model already in {args.out}: val {previous:.3f} (main head)", flush=True)
    torch.manual_seed(args.seed)  # the same initial weights whether or not a previous model was scored

    if args.mtp_from is not None:
        model = DeepseekV3ForCausalLM.from_pretrained(args.mtp_from, dtype=torch.float32)
        model.requires_grad_(False)
        cfg = model.config
        cfg.num_nextn_predict_layers = 1
    else:
        cfg = build_config(args)
        model = DeepseekV3ForCausalLM(cfg).float()
    cfg._experts_implementation = args.experts_impl  # training speed only; not saved
    mtp = MultiTokenPredictor(cfg).float()
    mtp.apply(model._init_weights)  # transformers initialises a model's modules, not a loose layer's
    if args.mtp_from is not None and args.mtp_distill:
        warm_start_mtp(mtp, args.mtp_from, cfg.num_hidden_layers)
    model.model.layers.append(mtp.block)  # saved as layer num_hidden_layers; transformers never runs it
    model.train()
    trained = mtp if args.mtp_from is not None else model
    balancer = RouterBalancer(trained, rate=5e-3)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, {sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M trained",
          flush=True)

    named = list(trained.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n and "gate.weight" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train_ids, args.seq, args.batch, gen)
    budget = args.minutes * 60
    t_train = time.time()
    # The cosine schedule spans --steps. If, measured over steps 10..50, they
    # will not fit in the time budget, `total` is shrunk so the schedule still
    # ends cleanly (the run is then no longer bit-reproducible across machines).
    total = args.steps
    ema = None
    t10 = 0.0
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5)
    step = 0
    for step in bar:
        lr = lr_at(step, total, args.warmup, args.lr, args.lr * 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(data)
        with autocast():
            loss_main, loss_mtp = forward_losses(model, mtp, x, y, main_loss=args.mtp_from is None,
                                                 distill=args.mtp_distill)
        loss = loss_mtp if loss_main is None else loss_main + args.mtp_weight * loss_mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        imbalance = balancer.step()
        shown = (loss_main if loss_main is not None else loss_mtp).item()  # the MTP loss when it alone trains
        ema = shown if ema is None else 0.98 * ema + 0.02 * shown
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", imb=f"{imbalance:.2f}")
        elapsed = time.time() - t_train
        if step == 10:
            t10 = elapsed
        if step == 50:
            per_step = (elapsed - t10) / 40
            est = int((budget - elapsed) / (per_step * 1.05)) + step + 1  # 5% for evals
            if est < total:
                total = max(est, args.warmup + 1)
                bar.write(f"time budget: ~{per_step:.2f}s/step -> schedule shrunk to {total} steps")
            else:
                bar.write(f"~{per_step:.2f}s/step: {total} steps fit in the {args.minutes:g} min budget")
        if (step + 1) % args.eval_every == 0:
            balancer.enabled = False
            val, val_mtp = evaluate(model, mtp, val_ids, args.seq, args.batch * 2, autocast)
            balancer.enabled = True
            agree = mtp_agreement(model, mtp, val_ids[: 4 * (args.seq + 1)].view(4, -1))
            bar.write(f"step {step + 1:5d}  train {ema:.3f}  val {val:.3f}  val(mtp) {val_mtp:.3f}  "
                      f"agree(mtp) {agree:.3f}  lr {lr:.2e}  "
                      f"imbalance {imbalance:.2f}  [{elapsed / 60:.1f} min]")
        if step + 1 >= total or elapsed > budget:
            break
    bar.close()
    balancer.enabled = False
    val, val_mtp = evaluate(model, mtp, val_ids, args.seq, args.batch * 2, autocast)
    agree = mtp_agreement(model, mtp, val_ids[: 16 * (args.seq + 1)].view(16, -1))
    print(f"final: steps {step + 1}  train(ema) {ema:.3f}  val {val:.3f}  ppl {math.exp(val):.1f}  "
          f"val(mtp) {val_mtp:.3f}  agree(mtp) {agree:.3f}  train time {(time.time() - t_train) / 60:.1f} min",
          flush=True)
    if previous is not None and val > previous and not args.force:
        print(f"not saved: the main head's val loss {val:.3f} is worse than the model in {args.out} ({previous:.3f}); "
              "train longer (--minutes, --steps) or pass --force", flush=True)
        return 1

    save(model, tok, cfg, args.out, args)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved {args.out} ({size / 1e6:.1f} MB): {sorted(f.name for f in args.out.iterdir())}")
    print(f"total wall time {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
