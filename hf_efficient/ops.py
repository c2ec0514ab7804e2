"""Python side of the ``torch.ops.hf_efficient`` library: loads the C++ CPU kernels.

C++ CPU kernels (csrc/, module ``hf_efficient._C``) define op schemas with ``TORCH_LIBRARY_FRAGMENT``;
importing this module registers them (``HAS_CPP_OPS`` says whether the build step ran). Fake (meta)
implementations sit beside each op's Python glue (``quantization/lut/kernel.py``, ``quantization/gpu.py``,
``attention/seer/ops.py``) so ``torch.compile`` and meta-device loading trace through them. Call sites use
``torch.ops.hf_efficient.<name>``.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

try:
    from . import _C  # noqa: F401  (import registers the C++ ops)

    HAS_CPP_OPS = True
except ImportError as e:  # an install without the build step (e.g. a source checkout on PYTHONPATH)
    HAS_CPP_OPS = False
    logger.warning("hf_efficient C++ ops are not built (%s); reinstall with "
                   "`pip install --no-build-isolation .`", e)
