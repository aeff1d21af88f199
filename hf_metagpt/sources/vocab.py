"""mergekit's tokenizer sources (`tokenizer_source:` / `tokenizer: {source: ...}`): the output's
vocabulary rows follow a tokenizer, not the embedding matrices.

With `base` or a model, the output has as many embedding rows as that tokenizer has tokens
(`len(tokenizer)`: padding rows past it are left out, as mergekit 0.1.5 does), rows of tokens every
input has are merged, and rows of tokens only the source has are its own. `union` is the vocabulary
of every input together; we build it when one input's vocabulary holds every other's at the same
ids (fine-tunes that appended tokens, e.g. ChatML's): that input is then the tokenizer source, and a
row only it has is its own (mergekit's choice for a token one model adds, checked on tiny models).
Vocabularies that would need renumbering are refused, saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..errors import IncompatibleModelsError
from .model import ModelInfo

log = logging.getLogger(__name__)


def vocabulary(info: ModelInfo, token: str | None = None) -> dict[str, int]:
    """token -> id of an input's tokenizer (tokenizer.json; transformers for other formats)."""
    path = _tokenizer_file(info, token)
    if path is not None:
        data = json.loads(path.read_text())
        model = data.get("model") or {}
        vocab = model.get("vocab")
        out: dict[str, int] = {}
        if isinstance(vocab, dict):
            out.update({str(k): int(v) for k, v in vocab.items()})
        elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
            out.update({str(p[0]): i for i, p in enumerate(vocab)})
        for t in data.get("added_tokens") or []:
            out[str(t["content"])] = int(t["id"])
        if out:
            return out
    folder = info.ref.local_path
    if folder is None:
        raise IncompatibleModelsError(f"{info.name} has no tokenizer.json to read its vocabulary from.",
                                      hint="Use tokenizer_source: base, or a model that has a tokenizer.json.")
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def _tokenizer_file(info: ModelInfo, token: str | None) -> Path | None:
    folder = info.ref.local_path
    if folder is not None:
        path = folder / "tokenizer.json"
        return path if path.is_file() else None
    if info.ref.is_hub and (info.files is None or "tokenizer.json" in info.files):
        from huggingface_hub import hf_hub_download

        from .hub_calls import call, tok

        return Path(call(info.name, hf_hub_download, info.ref.repo_id, "tokenizer.json", revision=info.ref.sha,
                         token=tok(token)))
    return None


def vocab_rows(mode: str, tok: int, inputs: Sequence[ModelInfo], token: str | None = None
               ) -> tuple[int, int, int, list[str]]:
    """(tokenizer source index, output rows, rows merged from every input, warnings) for a mergekit
    tokenizer `mode` ("base", "model" — the source `tok` —, or "union")."""
    vocabs = [vocabulary(i, token) for i in inputs]
    warnings: list[str] = []
    if mode == "union":
        tok = _superset(vocabs, inputs)
    source = vocabs[tok]
    for i, v in enumerate(vocabs):
        clash = next((t for t, k in v.items() if t in source and source[t] != k), None)
        if clash is not None:
            raise IncompatibleModelsError(
                f"Token {clash!r} has id {v[clash]} in {inputs[i].name} but {source[clash]} in {inputs[tok].name}: "
                "their vocabularies would need renumbering.",
                hint="hf-metagpt builds a vocabulary when the models' tokens keep their ids (appended tokens); "
                     "use tokenizer_source: base (or one model) instead.")
    out_rows = max(source.values()) + 1
    shared = min(min(len(v) for v in vocabs), out_rows)
    shared = min([shared] + [i.vocab_rows or shared for i in inputs])
    if mode == "union":
        ids = [set(v.values()) for v in vocabs]
        holders = [inputs[i].name for i in range(len(inputs))
                   if i != tok and any(r in ids[i] for r in range(shared, out_rows))]
        if holders:
            warnings.append(f"tokens past id {shared - 1} are in {inputs[tok].name} and in {', '.join(holders)} but not "
                            f"in every model: their rows are {inputs[tok].name}'s (mergekit merges such rows)")
    return tok, out_rows, shared, warnings


def _superset(vocabs: list[dict[str, int]], inputs: Sequence[ModelInfo]) -> int:
    """The input whose vocabulary holds every other's tokens (the base when it does)."""
    for i, v in enumerate(vocabs):
        if all(t in v for other in vocabs for t in other):
            return i
    raise IncompatibleModelsError(
        "tokenizer_source union: no model's vocabulary holds every other's "
        f"({', '.join(f'{m.name}: {len(v)} tokens' for m, v in zip(inputs, vocabs))}).",
        hint="hf-metagpt builds a union when one model's tokens contain all the others' (fine-tunes that added "
             "tokens); otherwise use tokenizer_source: base or one of the models.")
