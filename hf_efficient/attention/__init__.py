"""Attention capabilities of hf-efficient (each registers an ``attn_implementation`` at import)."""
