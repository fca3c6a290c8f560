"""GPTQ (Frantar et al., 2022) into MatMulNBits' symmetric blockwise layout (``export/quant.py``).

Columns of ``W [N, K]`` are quantized in order and each one's rounding error is pushed onto the
columns not yet quantized, weighted by the inverse Hessian ``(X^T X)^-1`` of the layer's inputs on
calibration text (``export/calibration.py``): what shrinks is the error of the layer's *output*
on real activations, not of the weight. Measured on the trained tiny GLMs and on correlated
synthetic inputs, the output error is about half of the scale search's (``tests/unit/test_gptq.py``).

The pass runs in torch (float32, as GPTQ's reference does): numpy has no triangular solver for
the factorization, and its per-column rank-1 update allocates a temporary where torch's ``addr_``
updates in place. Only the exporter imports this module.
"""

from __future__ import annotations

import numpy as np

from export.quant import QuantizedWeight, _pack_nibbles, symmetric_scales

__all__ = ["GPTQ_DAMP", "quantize_gptq"]


GPTQ_DAMP = 0.01  # of the Hessian's mean diagonal, added to its diagonal (GPTQ's percdamp)
_GPTQ_BATCH = 128  # columns per lazy batch: the trailing columns are updated once per batch


def quantize_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    *,
    search: bool = True,
    damp: float = GPTQ_DAMP,
) -> QuantizedWeight:
    """``weight [N, K]`` quantized symmetric blockwise by GPTQ against ``hessian [K, K]`` (``X^T X``).

    Each block's scale is chosen when the pass reaches the block, on its weights as updated by the
    errors of the columns before it (:func:`search_scales` with ``search``, else the peak on the
    lowest level); the layout is :func:`quantize_blockwise`'s with ``symmetric=True``. An input the
    calibration never activated (a zero row and column of H) holds only the damping: its column is
    rounded on its own and takes no other column's error (GPTQ's reference zeroes such weights
    instead; kept here, since the gate's prompts may well activate it).
    """
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian is {hessian.shape}; the weight needs ({k}, {k})")
    if not np.isfinite(weight).all():
        raise ValueError("the weight has NaN or infinite values; it cannot be quantized")
    if not np.isfinite(hessian).all():
        raise ValueError("the calibration Hessian has NaN or infinite values")
    k_blocks = -(-k // block_size)
    kp = k_blocks * block_size
    mid = 1 << (bits - 1)
    h = np.zeros((kp, kp), np.float32)
    h[:k, :k] = hessian
    diag = np.diagonal(h).copy()
    live = diag[:k] > 0
    mean = float(diag[:k][live].mean()) if live.any() else 1.0
    diag[k:] = mean  # padding: zero weights, any positive diagonal keeps the factorization defined
    h[np.diag_indices(kp)] = diag + damp * mean
    import torch

    u = torch.from_numpy(_inverse_factor(h))
    wt = torch.zeros((kp, n))  # columns as rows: each step reads one contiguous row
    wt[:k] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    codes = torch.empty((kp, n), dtype=torch.uint8)
    scales = np.empty((k_blocks, n), np.float32)
    batch = block_size * max(1, _GPTQ_BATCH // block_size)  # whole blocks: a scale sees every update
    scale = torch.ones(n)
    threads = torch.get_num_threads()
    try:
        for i1 in range(0, kp, batch):
            i2 = min(i1 + batch, kp)
            err = torch.empty((i2 - i1, n))
            # one thread for the column steps: each op is a vector or a thin update, and waking the
            # pool per op cost 4-10x on a 2-core box (measured); the trailing update below uses them all
            torch.set_num_threads(1)
            for j in range(i1, i2):
                if j % block_size == 0:
                    blocks = wt[j : j + block_size].T.contiguous().numpy()[:, None, :]
                    scales[j // block_size] = symmetric_scales(blocks, bits, search)[:, 0]
                    scale = torch.from_numpy(scales[j // block_size])
                w = wt[j]
                q = torch.clamp(torch.round(w / scale), -mid, mid - 1)
                codes[j] = (q + mid).to(torch.uint8)
                e = (w - q * scale) / u[j, j]
                if j + 1 < i2:  # in place (BLAS ger): no temporary of the batch's size per column
                    wt[j + 1 : i2].addr_(u[j, j + 1 : i2], e, alpha=-1)
                err[j - i1] = e
            torch.set_num_threads(threads)
            if i2 < kp:
                wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1)
    finally:
        torch.set_num_threads(threads)
    q_rows = np.ascontiguousarray(codes.numpy().T).reshape(n, k_blocks, block_size)
    return QuantizedWeight(
        packed=_pack_nibbles(q_rows) if bits == 4 else q_rows,
        scales=np.ascontiguousarray(scales.T).reshape(-1),
        zero_points=None,
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
    )


def _inverse_factor(h: np.ndarray) -> np.ndarray:  # float32 [K, K]
    """U, upper triangular with ``U^T U = H^-1`` (GPTQ's Hinv): row j says how column j's error
    spreads over the columns after it. More damping where float32 finds H not positive definite."""
    import torch

    t = torch.from_numpy(h)
    mean = float(t.diagonal().mean())
    for extra in (0.0, 0.01, 0.1, 1.0):
        damped = t + extra * mean * torch.eye(t.shape[0]) if extra else t
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper.numpy()
    raise ValueError("the calibration Hessian is not positive definite even with damping")
