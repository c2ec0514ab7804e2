"""Glue between hf-efficient and the Hugging Face libraries (transformers, peft, accelerate)."""
