"""SeerAttention settings: gate architecture (fixed once trained) and block-selection (changeable any time)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

FORMAT_VERSION = 1
MODES = ("threshold", "topk", "sparsity")
DECODE = ("dense", "sparse", "sparse_kv")


@dataclass(frozen=True)
class SeerAttentionConfig:
    block_size: int = field(default=64, metadata={"help": "tokens per block for the gate and the sparse kernel "
                                                          "(16, 32, 64 or 128; the paper uses 64)"})
    gate_dim: int = field(default=64, metadata={"help": "width of the per-head gate projections"})
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the block-level RoPE on gate features"})
    mode: str = field(default="sparsity", metadata={"help": "how the gate's block scores become a block mask: "
                                                            "'threshold', 'topk' or 'sparsity'"})
    threshold: float = field(default=2e-3, metadata={"help": "mode 'threshold': keep blocks whose gate "
                                                             "probability is >= this"})
    top_k: int = field(default=16, metadata={"help": "mode 'topk': key blocks kept per query block"})
    sparsity: float = field(default=0.7, metadata={"help": "mode 'sparsity': fraction of each query block's "
                                                           "causal key blocks to skip, in [0, 1)"})
    decode: str = field(default="dense", metadata={"help": "decode / short chunks on a KV cache: 'dense' (exact "
                                                           "SDPA), 'sparse' (the gate picks each query head's KV "
                                                           "blocks) or 'sparse_kv' (one pick per KV head, shared "
                                                           "by its query heads); see attention/seer/decode.py"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "version of the saved gate format"})

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"SeerAttentionConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if self.block_size not in (16, 32, 64, 128):
            bad("block_size", "16, 32, 64 or 128")
        if not isinstance(self.gate_dim, int) or self.gate_dim < 2 or self.gate_dim % 2:
            bad("gate_dim", "an even integer >= 2")
        if not self.rope_theta > 0:
            bad("rope_theta", "a positive number")
        if self.mode not in MODES:
            bad("mode", MODES)
        if not 0.0 <= self.threshold <= 1.0:
            bad("threshold", "a probability in [0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            bad("top_k", "an integer >= 1")
        if not 0.0 <= self.sparsity < 1.0:
            bad("sparsity", "a fraction in [0, 1)")
        if self.decode not in DECODE:
            bad("decode", DECODE)
        if self.format_version != FORMAT_VERSION:
            bad("format_version", f"{FORMAT_VERSION} (this version of hf-efficient)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SeerAttentionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SeerAttentionConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def with_selection(self, **changes) -> "SeerAttentionConfig":
        """A copy with new block-selection settings (``mode``, ``threshold``, ``top_k``, ``sparsity``, ``decode``)."""
        arch = {"block_size", "gate_dim", "rope_theta", "format_version"} & set(changes)
        if arch:
            raise ValueError(f"{sorted(arch)} are fixed by the trained gates; only mode/threshold/top_k/sparsity/"
                             f"decode can change after training")
        return replace(self, **changes)
