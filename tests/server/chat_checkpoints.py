"""Test checkpoints whose tokenizer carries a chat template from tests/server/templates, its markers added as
special tokens (as real checkpoints have them), shared by the chat-template and tool-call tests."""

from __future__ import annotations

import json
from pathlib import Path

from checkpoints import build_checkpoint

TEMPLATES = Path(__file__).parent / "templates"
# The markers each template writes, added to the test tokenizer as special tokens (real checkpoints have them).
MARKERS = {
    "chatml_tools": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"],
    "llama3_tools": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "deepseek_tools": ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<｜tool▁calls▁begin｜>",
                       "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                       "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                       "<｜tool▁output▁end｜>"],
}


def shipped_templates() -> dict[str, tuple[str, list[str]]]:
    """Real checkpoints' templates that transformers itself ships in its source (name -> template, its markers);
    any that this transformers lacks is left out."""
    import importlib

    found = {}
    for name, module, attribute, markers in [
        ("llama4", "transformers.models.llama4.processing_llama4", "chat_template",
         ["<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>", "<|python_end|>"]),
        ("smolvlm", "transformers.models.smolvlm.processing_smolvlm", "DEFAULT_CHAT_TEMPLATE",
         ["<|im_start|>", "<end_of_utterance>"]),
    ]:
        try:
            template = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            continue
        if isinstance(template, str):
            found[name] = (template, markers)
    return found


def write_tokenizer_dir(source: Path, target: Path, name: str, template: str | None = None,
                        markers: list[str] | None = None) -> None:
    """source's tokenizer with `name`'s markers added as special tokens and its template (from
    tests/server/templates unless given) as the chat template."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    target.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (markers or MARKERS[name])])
    tok.save(str(target / "tokenizer.json"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = template or (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def long_context_checkpoint(tmp_path_factory, template: str) -> Path:
    """The tiny Llama with a 1024-token context (a conversation with tools outgrows 256) and `template`."""
    folder = tmp_path_factory.mktemp(f"llama-{template}")
    build_checkpoint("llama", folder, max_position_embeddings=1024)
    write_tokenizer_dir(folder, folder, template)
    return folder
