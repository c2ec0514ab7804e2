"""GPTQ-style calibrated quantization of one weight matrix, for every format of :mod:`hf_efficient.formats`.

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet
quantized through the upper Cholesky factor ``U`` of the damped inverse Hessian ``(H + λI)⁻¹``, with
``H = 2 X Xᵀ / n`` over the layer inputs (Frantar et al., 2022). The work is organised as the paper's
lazy block updates: inside a block of ``block_size`` columns, a column costs a handful of vector ops over
the ``N`` output rows and one rank-1 update of the rest of the block; the columns after the block receive
the block's accumulated errors in one matmul. Rows are independent given ``H``, so several layers that
read the same input (q/k/v, gate/up) can be quantized as one stacked matrix with identical results.

The format only enters through ``formats.fit_params`` and its value grid, so symmetric, zero-point and AFPQ
two-scale formats all work: AFPQ's (s_pos, s_neg) replace GPTQ's (scale, zero). Without ``act_order`` a
group's parameters are fitted when its first column is reached, on the weights as updated by the error
feedback so far (GPTQ's groupwise variant); with ``act_order`` columns go by decreasing Hessian diagonal and
group parameters are fitted up front on the original weights ("static groups"), so the stored layout stays
in the original column order with contiguous groups.

The column loop is sequential by nature (each column's input is the previous columns' error feedback), so
its cost is a fixed number of small tensor ops per column: :class:`_ColumnRounder` keeps that number low
(one op per scheme step, views made once per block, and for grids of consecutive integers a ceil/clamp
instead of a search).
"""
from __future__ import annotations

import contextlib

import torch

from .. import formats
from .linear import check_finite, group_params
from .packing import n_groups


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of the inputs a linear layer sees.

    The sum is kept unscaled and divided by ``n`` once, when ``H`` is read: one matmul per batch of inputs
    and no pass over the ``K × K`` matrix (equal to rescaling at every batch up to float rounding).
    """

    def __init__(self, in_features: int, device=None):
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._H = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self._sum.addmm_(x.T, x)
        self.n += x.shape[0]
        self._H = None

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._H = self._sum * (2.0 / max(self.n, 1))
        return self._H


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), raising λ if H is not positive definite.

    With ``J`` the order-reversing permutation and ``J H J = L Lᵀ`` (lower Cholesky), ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)``
    and ``J L⁻¹ J`` is upper triangular, so ``U`` is one Cholesky and one triangular inverse: a third of the
    work of factorising, inverting, and factorising the inverse again (Cholesky factors are unique, so the
    result is the same up to rounding; ``tests/test_gptq.py`` checks it against that route).
    """
    mean_diag = torch.mean(torch.diag(H)).clamp(min=1e-8)
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    flipped = H.flip(0, 1)
    base = flipped.diagonal().clone()
    for factor in (1, 10, 100, 1000):
        flipped.diagonal().copy_(base).add_(mean_diag * (damp * factor + (0 if damp else 1e-6)))
        L, info = torch.linalg.cholesky_ex(flipped)
        if info == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            if torch.isfinite(Linv).all():
                return Linv.flip(0, 1)
    raise ValueError("the calibration Hessian is not positive definite even with 1000x dampening; "
                     "use more calibration samples")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The per-column ops touch one column (~10³ values): splitting them over OpenMP threads costs more
    than it saves on a small, busy CPU."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _ColumnRounder:
    """Round-to-nearest of one column (N,) onto the format's grid, given that column's group parameters.

    Nearest-value search runs over the sorted distinct grid values (ties to the smaller value, as
    :func:`formats.encode`). For two-scale formats the search runs over the whole grid with ``w`` divided
    by ``s_neg`` where ``w < 0`` and by ``s_pos`` elsewhere: a non-negative ratio is never nearer a negative
    grid value than to 0, so this equals encoding each sign against its own half-grid, and a grid value has
    the sign of its ``w`` (or is 0), so the same mask picks the decoding scale. When the distinct values are
    consecutive integers (INT formats) the nearest one is ``clamp(ceil(x - 1/2))``, which also rounds ties
    down, in three elementwise ops instead of a search and a lookup.

    The loop stores, per column, the grid value ``v`` (``vals_out``) and the decoded weight (``q_out``);
    :meth:`codes` turns the grid values into codes once at the end.
    """

    def __init__(self, fmt: formats.NumericFormat, device):
        vals, codes = formats._nearest_table(fmt, "all")
        self.fmt = fmt
        self.scheme = fmt.scale_scheme
        self.vals = torch.tensor(vals, dtype=torch.float32, device=device)
        self.mid = (self.vals[1:] + self.vals[:-1]) / 2
        self.codes_table = torch.tensor(codes, dtype=torch.uint8, device=device)
        self.integer_grid = all(v == vals[0] + i for i, v in enumerate(vals))
        self.lo, self.hi = vals[0], vals[-1]

    def column_params(self, params: dict) -> dict:
        """Per-column rows (..., N) of what the rounding reads, from the format's group parameters: the scheme's
        ``a``/``b`` (``fmt.scale_scheme``) and the divisors ``da``/``db`` (zero scales -> 1, formats' rule)."""
        safe = lambda s: torch.where(s > 0, s, torch.ones_like(s))  # noqa: E731
        a, b = self.scheme.kernel_ab(params)
        out = {"a": a, "da": safe(a)}
        if b is not None:
            out["b"] = b
            if self.scheme.split_sign:
                out["db"] = safe(b)
        return out

    def block(self, P: dict, vals_out: torch.Tensor, q_out: torch.Tensor):
        """A function ``round(i, w)`` for the columns of one block: writes the grid value of each entry of the
        block's column ``i`` (``w``) into ``vals_out[i]`` and its decoded value into ``q_out[i]``, reading that
        column's parameters from the rows ``P[...][i]`` (rows that a group fit later overwrites in place are
        read as updated: the views below share their storage)."""
        a, da = P["a"].unbind(0), P["da"].unbind(0)
        b = P["b"].unbind(0) if "b" in P else None
        db = P["db"].unbind(0) if "db" in P else None
        V, Q = vals_out.unbind(0), q_out.unbind(0)
        mid, vals, lo, hi = self.mid, self.vals, self.lo, self.hi
        offset, split = self.scheme.offset, self.scheme.split_sign
        integer = self.integer_grid

        def to_grid(x, i):
            if integer:
                return torch.sub(x, 0.5, out=V[i]).ceil_().clamp_(lo, hi)
            return torch.index_select(vals, 0, torch.searchsorted(mid, x), out=V[i])

        def round_offset(i, w):  # (v - b) * a
            v = to_grid(torch.addcdiv(b[i], w, da[i]), i)
            torch.sub(v, b[i], out=Q[i]).mul_(a[i])

        def round_split(i, w):  # v * (b if w < 0 else a)
            neg = w < 0
            v = to_grid(w / torch.where(neg, db[i], da[i]), i)
            torch.mul(v, torch.where(neg, b[i], a[i]), out=Q[i])

        def round_sym(i, w):  # v * a
            torch.mul(to_grid(w / da[i], i), a[i], out=Q[i])

        return round_offset if offset else round_split if split else round_sym

    def codes(self, vals: torch.Tensor) -> torch.Tensor:
        """uint8 codes of grid values ``vals`` (each exactly one of ``self.vals``)."""
        if self.integer_grid:
            return self.codes_table[(vals - self.lo).long()]
        return self.codes_table[torch.searchsorted(self.vals, vals)]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, fmt, group_size: int, scale_dtype=torch.float16,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  name: str | None = None) -> tuple[torch.Tensor, dict]:
    """Quantize ``weight`` (N, K) given the input Hessian ``H`` (K, K).

    ``group_size`` columns share parameters along K (the last group may be shorter); ``block_size`` is the
    lazy-update block. Returns ``(codes uint8 (N, K), {param: (N, n_groups) float32})`` in the original
    column order, ready for :meth:`QuantLinear.load_quantized`. Raises ValueError for a non-finite weight
    or a Hessian of the wrong shape.
    """
    fmt = formats.get_format(fmt)
    check_finite(weight, name)
    W = weight.detach().float().clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match in_features {K}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    g = min(int(group_size), K)
    H = H.float().clone()
    dead = torch.diag(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0  # inputs that are always zero: any value works, zero is exact

    ng = n_groups(K, g)
    if act_order:
        params = group_params(fmt, W, g, scale_dtype)
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
        # Column k of the (permuted) weight is row k here: every per-column op reads contiguous memory.
        WT = W[:, perm].T.contiguous()
        group_of = perm // g
    else:
        params = {p: torch.zeros(N, ng, device=W.device) for p in fmt.param_names}
        perm = None
        WT = W.T.contiguous()
        group_of = torch.arange(K, device=W.device) // g
    del W
    U = _inverse_hessian_cholesky(H, damp)
    del H
    QT = torch.empty_like(WT)
    VT = torch.empty_like(WT)  # grid value of each weight (codes at the end)
    D = torch.empty(min(block_size, K), N, device=WT.device)
    rounder = _ColumnRounder(fmt, WT.device)

    with _one_cpu_thread(WT.device):
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1, D1 = WT[i1:i2], D[: i2 - i1]
            U1 = U[i1:i2, i1:i2]
            diag = torch.diag(U1)
            R1 = U1 / diag[:, None]  # row i: how column i's rounding error moves the later columns
            # Per-column parameter rows of this block; without act_order a group that starts inside the block
            # overwrites its rows when it is fitted, a group begun in an earlier block is already fitted.
            P1 = {k: t.contiguous() for k, t in
                  rounder.column_params({p: t[:, group_of[i1:i2]].T for p, t in params.items()}).items()}
            round_column = rounder.block(P1, VT[i1:i2], QT[i1:i2])
            cols, errs, quant = W1.unbind(0), D1.unbind(0), QT[i1:i2].unbind(0)
            for i in range(i2 - i1):
                col = i1 + i
                if not act_order and col % g == 0:
                    # Fit this group on the weights as updated by the error feedback so far (the columns
                    # past this block have had every earlier block's update, not yet this block's).
                    stop = min(col + g, K)
                    cur = W1[i: i + stop - col] if stop <= i2 else torch.cat([W1[i:], WT[i2:stop]])
                    fitted = formats.fit_params(fmt, cur.T, scale_dtype)
                    for p in params:
                        params[p][:, col // g] = fitted[p]
                    for k, t in rounder.column_params(fitted).items():
                        P1[k][i: min(stop, i2) - i1] = t
                w = cols[i]
                round_column(i, w)
                torch.sub(w, quant[i], out=errs[i])
                if i + 1 < i2 - i1:
                    W1[i + 1:].addr_(R1[i, i + 1:], errs[i], alpha=-1)
            if i2 < K:
                WT[i2:].addmm_(U[i1:i2, i2:].T, D1 / diag[:, None], alpha=-1)

    codes = rounder.codes(VT).T
    if perm is None:
        return codes.contiguous(), params
    out = torch.empty(N, K, dtype=torch.uint8, device=codes.device)
    out[:, perm] = codes
    return out, params
