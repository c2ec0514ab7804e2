"""Calibrated quantization API and the ``hf-efficient quantize`` command (being written)."""
