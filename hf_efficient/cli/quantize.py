"""``hf-efficient quantize``: quantize a model (AFPQ / MoFQ / LUT, GPTQ-style or RTN) into a packed checkpoint.

Every format option defaults to ``None``, meaning "the config class's default", so the command and
``AFPQConfig()`` / ``MoFQConfig()`` / ``LUTConfig()`` never disagree (tests/test_cli.py checks it).
"""
from __future__ import annotations

from pathlib import Path

from .common import CliError, add_model_args, check_writable_file, positive_int, setup_runtime

HELP = "quantize a model (AFPQ / MoFQ / LUT; GPTQ-style or RTN) into a packed checkpoint"
METHODS = ("afpq", "mofq", "lut")
_CLASS_DEFAULT = "unset: the config class's value"


def configure(p) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory of the quantized checkpoint")
    p.add_argument("--config", default=None,
                   help="JSON config file or recipe name (e.g. afpq-fp4-g128, mofq-w8a8; see hub_configs/); "
                        "options given below override its fields")
    p.add_argument("--method", choices=METHODS, default="afpq", help="quantization method (ignored with --config)")
    p.add_argument("--fmt", choices=("fp", "nf", "int"), default=None, help=f"afpq/lut: number format ({_CLASS_DEFAULT})")
    p.add_argument("--bits", type=positive_int, default=None, help=f"weight bits ({_CLASS_DEFAULT})")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"columns per scale group; -1 per-channel ({_CLASS_DEFAULT})")
    p.add_argument("--symmetric", action="store_true", help="afpq/lut: one absmax scale instead of two scales / "
                                                            "a zero point")
    p.add_argument("--act-bits", type=positive_int, default=None, help="mofq: 8 for W8A8 (None: weight-only)")
    p.add_argument("--algorithm", choices=("gptq", "rtn"), default=None, help=f"calibrated GPTQ-style or "
                                                                              f"round-to-nearest ({_CLASS_DEFAULT})")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--calib-samples", type=positive_int, default=None, help=f"calibration windows ({_CLASS_DEFAULT})")
    p.add_argument("--calib-seqlen", type=positive_int, default=None, help=f"tokens per window ({_CLASS_DEFAULT})")
    p.add_argument("--calib-source", default=None, help=f"calibration text: mixed, plays, generated, a .txt file or "
                                                         f"folder, or dataset:NAME[:SPLIT[:COLUMN]] ({_CLASS_DEFAULT})")
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="score this many held-out tokens (context 2048) after quantizing and record the perplexity "
                        "in the checkpoint's model card (0: skip)")
    p.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help=f"storage dtype of the scales ({_CLASS_DEFAULT})")


def config_from_args(args):
    """The config the options describe; unset options keep the config class's (or the --config file's) values."""
    from .. import registry
    from ..quantization.api import load_config_file

    given = dict(bits=args.bits, group_size=args.group_size, scale_dtype=args.scale_dtype, algorithm=args.algorithm,
                 act_order=args.act_order or None, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                 calib_source=args.calib_source)
    method = args.method
    if method in ("afpq", "lut"):
        given.update(fmt=args.fmt, asymmetric=False if args.symmetric else None)
    elif args.fmt is not None or args.symmetric:
        raise CliError(f"--fmt/--symmetric apply to afpq and lut, not {method} (MoFQ picks INT or FP per layer)")
    if method == "mofq":
        given.update(act_bits=args.act_bits)
    elif args.act_bits is not None:
        raise CliError(f"--act-bits applies to mofq (W8A8), not {method}")
    given = {k: v for k, v in given.items() if v is not None}
    try:
        if args.config:
            cfg = load_config_file(args.config)
            return type(cfg).from_dict({**cfg.to_dict(), **given})
        return registry.register_all().quantization[method].config_cls(**given)
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from None


def run(args) -> int:
    out = Path(args.out)
    check_writable_file(out / "config.json") if out.is_dir() else check_writable_file(out)
    config = config_from_args(args)
    device = setup_runtime(args)
    from ..quantization.api import quantize

    if args.eval_tokens < 0:
        raise CliError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    model, tok = quantize(args.model, config, None, device=device, progress=not args.no_progress)
    if args.eval_tokens:
        from ..data import token_ids
        from ..evaluation import perplexity

        ids = token_ids(tok, "eval", args.eval_tokens)
        ppl = perplexity(model, ids, context=min(2048, ids.numel()), progress=not args.no_progress)
        model.hf_efficient_metrics = {"perplexity": ppl, "perplexity_on": f"{ids.numel()} held-out tokens of the "
                                                                          f"eval plays, context 2048"}
        print(f"perplexity {ppl:.3f} on {ids.numel()} held-out tokens")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # packed tensors, config and the model card (with the perplexity if measured)
    tok.save_pretrained(out)
    n = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")
    print(f"quantized {n} linear layers with {config.quant_method} ({config.algorithm}); wrote {out}")
    if config.summary():
        print(config.summary())
    return 0
