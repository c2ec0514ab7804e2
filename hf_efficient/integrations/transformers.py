"""The one transformers ``HfQuantizer`` of hf-efficient, driven by config classes.

Every quantization method registers ``(name, ConfigClass)`` with
:func:`hf_efficient.registry.add_quantization_method`, which pairs it with this quantizer; the config's
:meth:`~hf_efficient.quantization.config.QuantConfigBase.layer_spec` says what each linear layer becomes,
its optional ``after_load(model)`` runs once loading is done (e.g. LUT builds its kernel layout) and its
``compileable`` attribute answers ``is_compileable``.

Loading paths:
* quantize on load (``from_pretrained(float_dir, quantization_config=cfg)``): linears become
  :class:`~hf_efficient.quantization.QuantLinear` on the meta device with a placeholder ``weight`` so the
  checkpoint's float weight reaches :class:`QuantizeOnLoad`, which returns ``qweight`` and the scales
  (round-to-nearest; MoFQ picks the format here). The placeholder is removed after loading.
* pre-quantized (a directory saved by ``save_pretrained`` or ``hf_efficient.quantization.quantize``): the
  layers are rebuilt from the saved config and the stored tensors load by name. The files are checked first
  (a truncated safetensors file fails naming it) and every float tensor after (NaN/inf scales fail naming the
  tensor).

Saving writes format_version 2: beside the packed tensors, a ``(1,)`` guard tensor under each layer's
``weight`` name (see :mod:`hf_efficient.quantization.packing`), so transformers *without* ``import
hf_efficient`` stops with a size-mismatch error instead of silently initialising every linear at random;
and a model card (README.md) that says what the checkpoint is and how to load it.
"""
from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from .. import formats
from ..checkpoint import CheckpointError, check_finite, check_safetensors_file
from ..quantization.card import install_card_writer
from ..quantization.config import QuantConfigBase, matches_module
from ..quantization.linear import QuantLinear, rtn_quantize, storage_tensors
from ..quantization.packing import FORMAT_VERSION, GUARD_KEY, GUARD_TENSOR, guard_tensor

logger = logging.getLogger(__name__)


class QuantizationLoadError(ValueError):
    """A quantized checkpoint that does not match its config (missing, extra or misshapen tensors)."""


def replace_linears(model: nn.Module, config: QuantConfigBase, skip: list[str], placeholder: bool,
                    device="meta") -> list[str]:
    """Replace every ``nn.Linear`` not matched by ``skip`` with a QuantLinear built from ``config``.

    With ``placeholder`` the new layer carries an empty float ``weight`` for quantize-on-load.
    Returns the replaced module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not matches_module(n, skip)]
    for name in names:
        lin = model.get_submodule(name)
        spec = config.layer_spec(name)
        with torch.device(device):
            q = QuantLinear(lin.in_features, lin.out_features, spec.fmt, spec.group_size, lin.bias is not None,
                            config.scale_torch_dtype, spec.act_fmt, dtype=lin.weight.dtype)
        if placeholder:
            q.weight = nn.Parameter(torch.empty(lin.out_features, lin.in_features, dtype=lin.weight.dtype,
                                                device=device), requires_grad=False)
        model.set_submodule(name, q)
    return names


def quantize_module_weight(module: QuantLinear, config: QuantConfigBase, name: str, weight: torch.Tensor,
                           inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """RTN-quantize ``weight`` for ``module`` (choosing the format if the config does) -> its tensors by name."""
    fmt = config.choose_format(name, weight, inputs)
    config.record_choice(name, fmt)
    spec = config.layer_spec(name)
    # Candidates of an on-load choice share one storage layout (the config checks it), so switching the
    # format of the already-built module only changes how its codes decode.
    module.fmt = formats.get_format(fmt)
    module.act_fmt = formats.get_format(spec.act_fmt) if spec.act_fmt else None
    codes, params = rtn_quantize(weight, module.fmt, module.group_size, module.scale_dtype, name)
    return storage_tensors(module.fmt, codes, params, module.scale_dtype)


def _checkpoint_shapes(files) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for f in files or []:
        if str(f).endswith(".safetensors"):
            check_safetensors_file(f)
            try:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        shapes[k] = tuple(h.get_slice(k).get_shape())
            except Exception as e:  # safetensors raises its own SafetensorError type
                raise CheckpointError(f"{f} is corrupt: {e}") from None
    return shapes


def check_checkpoint(model, converted: list[str], files, what: str) -> None:
    """Before loading a pre-quantized checkpoint, compare its tensor names and shapes with the layers the
    config describes; raise :class:`QuantizationLoadError` listing the differences (nothing is loaded)."""
    shapes = _checkpoint_shapes(files)
    if not shapes:
        return
    problems = []
    for name in converted:
        m = model.get_submodule(name)
        want = {k: tuple(t.shape) for k, t in m.state_dict().items() if k != "weight"}
        have = {k[len(name) + 1:]: v for k, v in shapes.items() if k.startswith(name + ".")}
        if have.get(GUARD_TENSOR) == tuple(guard_tensor().shape) and GUARD_TENSOR not in want:
            del have[GUARD_TENSOR]  # format_version 2's load guard, not a tensor of the layer
        if not have:
            problems.append(f"{name}: no tensors in the checkpoint")
            continue
        for k in sorted(set(want) - set(have)):
            problems.append(f"{name}.{k}: missing")
        for k in sorted(set(have) - set(want)):
            problems.append(f"{name}.{k}: unexpected (layer format {m.fmt.name} stores {sorted(want)})")
        for k in sorted(set(want) & set(have)):
            if want[k] != have[k]:
                problems.append(f"{name}.{k}: shape {list(have[k])} in the checkpoint, {list(want[k])} expected")
    if problems and len([p for p in problems if p.endswith("no tensors in the checkpoint")]) == len(converted):
        return  # names are prefixed differently (a renamed base model): leave matching to transformers
    if problems:
        raise QuantizationLoadError(
            f"{what} checkpoint does not match its quantization_config ({len(problems)} problems; nothing was "
            f"loaded): " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


class QuantizeOnLoad(ConversionOps):
    """Turns one float ``<layer>.weight`` from the checkpoint into the layer's packed tensors."""

    def __init__(self, hf_quantizer: "HfEfficientQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        (_, value), = input_dict.items()
        if missing_keys is not None:
            # The placeholder ``weight`` is consumed here, not missing: without this transformers would
            # "initialize" it after loading.
            missing_keys.discard(full_layer_name)
        value = value[0] if isinstance(value, list) else value
        prefix = full_layer_name.rsplit(".", 1)[0]
        module = model.get_submodule(prefix)
        try:
            tensors = quantize_module_weight(module, self.hf_quantizer.quantization_config, prefix, value)
        except Exception as e:
            # transformers logs conversion errors and goes on loading; keep ours to raise after loading.
            self.hf_quantizer.load_errors.append(str(e))
            raise
        if value.device.type == "cpu":  # the quantizer's temporaries just freed: back to the OS, not kept as heap
            from ..heap import release_free_heap

            release_free_heap()
        return {f"{prefix}.{k}": v.to(value.device) for k, v in tensors.items()}


# Quantize-on-load must stream. transformers' threaded loader submits every checkpoint tensor to its pool at once,
# so its workers put float tensors on the device faster than the main thread quantizes them and the load peak
# becomes the whole float model (seen on the GPU with transformers 5.17; later releases go sequential themselves
# for on-the-fly quantization). Sequential loading keeps about one float tensor alive at a time.
ASYNC_LOAD_ENV = "HF_DEACTIVATE_ASYNC_LOAD"


class HfEfficientQuantizer(HfQuantizer):
    """Generic quantizer: module replacement, quantize-on-load, pre-quantized reload, freezing."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._converted: list[str] = []
        self.load_errors: list[str] = []
        self._async_env: tuple[bool, str | None] | None = None  # the user's setting while we override it

    def validate_environment(self, *args, **kwargs):
        cfg = self.quantization_config
        if not isinstance(cfg, QuantConfigBase):
            raise TypeError(f"{type(self).__name__} needs an hf-efficient config, got {type(cfg).__name__}")
        reason = None if self.pre_quantized else cfg.needs_calibration()
        if reason:
            raise ValueError(f"{type(cfg).__name__} cannot quantize on load: {reason}. Run "
                             f"hf_efficient.quantization.quantize(model_path, config, out_dir) or `hf-efficient "
                             f"quantize`, then load the written checkpoint with from_pretrained(out_dir).")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, checkpoint_files=None,
                                             **kwargs):
        cfg = self.quantization_config
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert, keep_in_fp32_modules,
                                               add_default_skips=tied)
        self._converted = replace_linears(model, cfg, skip, placeholder=not self.pre_quantized)
        if not self.pre_quantized and self._converted:
            self._async_env = (ASYNC_LOAD_ENV in os.environ, os.environ.get(ASYNC_LOAD_ENV))
            os.environ[ASYNC_LOAD_ENV] = "1"
        if self.pre_quantized:
            check_checkpoint(model, self._converted, checkpoint_files, type(cfg).__name__)
            # The guards (GUARD_KEY, <layer>.weight) exist to stop a load without this package; here they are
            # expected and skipped. Patterns are searched in every unexpected key name.
            ignore = set(model._keys_to_ignore_on_load_unexpected or ())
            ignore.add(re.escape(GUARD_KEY) + "$")
            ignore.add(r"^(?:" + "|".join(re.escape(n) for n in self._converted) + r")\." + GUARD_TENSOR + "$")
            model._keys_to_ignore_on_load_unexpected = ignore
        if not self._converted:
            logger.warning("%s: no nn.Linear layer was converted (modules_to_not_convert=%s)",
                           type(cfg).__name__, cfg.modules_to_not_convert)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def param_element_size(self, model, param_name: str, param: torch.Tensor | None = None) -> float:
        """Bytes per element transformers budgets for ``param_name`` before loading (its one-shot allocator warm-up
        on the accelerator, ``device_map="auto"`` sizes). A placeholder float weight of quantize-on-load never
        stays: the packed buffers that replace it are budgeted on their own, so it counts 0. Counted at its float
        size, it made the warm-up allocate the whole float model plus the packed one at once (the GPU load peak,
        and an out-of-memory error under a memory cap the quantized model fits in). ``param`` is optional because
        some transformers releases pass only the name."""
        if self.param_needs_quantization(model, param_name):
            return 0
        if param is None:
            param = model.get_parameter_or_buffer(param_name)
        return param.element_size()

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def _restore_async_env(self) -> None:
        if self._async_env is not None:
            was_set, value = self._async_env
            if was_set:
                os.environ[ASYNC_LOAD_ENV] = value
            else:
                os.environ.pop(ASYNC_LOAD_ENV, None)
            self._async_env = None

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._restore_async_env()
        problems = list(self.load_errors)
        for name in self._converted:
            m = model.get_submodule(name)
            if "weight" in m._parameters:
                if m.weight.device.type != "meta":
                    problems.append(f"{name}: the float weight was loaded but never quantized")
                del m._parameters["weight"]
            for t_name, t in list(m.named_buffers(recurse=False)) + list(m.named_parameters(recurse=False)):
                # Tensors transformers loaded carry this flag; missing/mismatched ones were re-created empty.
                if t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False):
                    problems.append(f"{name}.{t_name}: missing from the checkpoint or not loaded")
            if m.bias is not None:
                m.bias.requires_grad_(False)
            if not problems:
                check_finite({f"{name}.{k}": t for k, t in m.state_dict().items()})
        if problems:
            raise QuantizationLoadError(
                f"{type(self.quantization_config).__name__} checkpoint does not match the model "
                f"({len(problems)} problems): " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
        summary = self.quantization_config.summary()
        if summary:
            logger.info(summary)
        install_card_writer(model)
        after_load = getattr(self.quantization_config, "after_load", None)
        if after_load is not None:
            after_load(model)
        if any(t.is_cuda for t in model.buffers()):
            from ..quantization.gpu import prepare_model

            prepare_model(model)  # each layer's kernel layout now, as its only copy (not at the first forward)
        else:
            from ..kernels import lut_cpu
            from ..quantization.lut import enable_fast_decode

            if lut_cpu.available():  # every format's CPU decode steps run fused, not only LUTConfig's
                enable_fast_decode(model)
        return model

    @property
    def is_compileable(self) -> bool:
        return bool(getattr(self.quantization_config, "compileable", False))

    def is_serializable(self, **kwargs):
        return True

    def get_state_dict_and_metadata(self, model):
        """The model's tensors plus the format_version 2 load guards (see the module docstring)."""
        state_dict = dict(model.state_dict())
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and f"{name}.{GUARD_TENSOR}" not in state_dict:
                state_dict[f"{name}.{GUARD_TENSOR}"] = guard_tensor()
        state_dict[GUARD_KEY] = guard_tensor()
        # config.json is written after this call: it must announce the layout the files now have.
        self.quantization_config.format_version = FORMAT_VERSION
        return state_dict, {"hf_efficient": "quantized by hf-efficient: pip install hf-efficient, then "
                                            "`import hf_efficient` before from_pretrained"}

    @property
    def is_trainable(self) -> bool:
        # Adapters (LoRA) train on top of the frozen quantized base.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False
