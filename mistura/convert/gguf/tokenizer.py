"""A byte-level BPE tokenizer as GGUF's tokenizer.ggml.* keys, and back.

llama.cpp runs mistura's tokenizer as its `gpt2` tokenizer model: the token strings (the
256 bytes as GPT-2's printable characters, then the merges' products), the merges in
rank order, and a type per token (control for the special tokens). Its pre-tokenizer
`gpt-2` splits text with the regex of `tokenizers`' ByteLevel pre-tokenizer, which
mistura's tokenizers use. A model with more embedding rows than tokens gets unused
`[PAD{i}]` tokens after the real ones, as llama.cpp's own converter writes them.

mistura normalises text to NFC first and llama.cpp does not: text already in NFC (what
editors and keyboards produce) encodes to the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, models

from mistura.convert.hf import SPECIAL_TOKENS, read_json
from mistura.data.tokenizer import byte_level
from mistura.errors import ConfigError

PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the ByteLevel regex
_KEYS = gguf.Keys.Tokenizer
_SETTERS = {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "pad": "add_pad_token_id"}


def write_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    """The tokenizer.ggml.* keys of the tokenizer.json at `path`, for a model of `vocab_size` embedding rows.

    A tokenizer that llama.cpp's gpt2 model would run otherwise (not byte-level BPE, another
    normaliser, a prefix space) raises ConfigError naming what differs.
    """
    spec = read_json(path)
    _check_byte_level(spec, path)
    special = {added["content"]: added["id"] for added in spec.get("added_tokens", []) if added.get("special")}
    tokens = spec["model"]["vocab"] | special
    by_id = sorted(tokens, key=tokens.__getitem__)
    if [tokens[token] for token in by_id] != list(range(len(by_id))):
        raise ConfigError(f"{path}: token ids are not 0..{len(by_id) - 1} without gaps, as GGUF's token list needs")
    if len(by_id) > vocab_size:
        raise ConfigError(f"{path}: {len(by_id)} tokens, more than the model's vocab_size={vocab_size}")
    padding = [f"[PAD{i}]" for i in range(len(by_id), vocab_size)]
    types = [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in by_id]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(by_id + padding)
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    roles = {role: id_ for role, (token, id_) in SPECIAL_TOKENS.items() if tokens.get(token) == id_}
    for role, id_ in roles.items():
        getattr(writer, _SETTERS[role])(id_)
    # Prompts start with BOS (mistura.infer.generate.encode_prompt); documents end with EOS only in training.
    writer.add_add_bos_token("bos" in roles)
    writer.add_add_eos_token(False)


def read_tokenizer(fields: dict[str, Any]) -> Tokenizer:
    """The `tokenizers` tokenizer of a GGUF file's tokenizer.ggml.* keys (a gpt2 tokenizer model),
    its unused padding tokens left out."""
    model = fields.get(_KEYS.MODEL)
    if model != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = fields.get(_KEYS.PRE, PRE_TOKENIZER)
    if pre not in (PRE_TOKENIZER, "default"):
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (only {PRE_TOKENIZER!r}, ByteLevel's regex)")
    tokens, types = fields[_KEYS.LIST], fields[_KEYS.TOKEN_TYPE]
    while types and types[-1] == gguf.TokenType.UNUSED:
        tokens, types = tokens[:-1], types[:-1]
    merges = [tuple(merge.split(" ")) for merge in fields.get(_KEYS.MERGES, [])]
    tokenizer = byte_level(models.BPE({token: id_ for id_, token in enumerate(tokens)}, merges))
    control = [token for token, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    return tokenizer


def _check_byte_level(spec: dict[str, Any], path: Path) -> None:
    """ConfigError unless the tokenizer is byte-level BPE as mistura trains it (see mistura.data.tokenizer)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    normalizer = (spec.get("normalizer") or {}).get("type")
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')!r}, not BPE")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append("its pre-tokenizer is not ByteLevel with GPT-2's regex and no prefix space")
    if normalizer not in (None, "NFC"):
        problems.append(f"its normaliser is {normalizer!r}")
    if problems:
        raise ConfigError(f"{path}: llama.cpp's gpt2 tokenizer cannot reproduce this tokenizer: {'; '.join(problems)}")
