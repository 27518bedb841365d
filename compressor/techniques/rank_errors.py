"""Kernel errors of every rank of a low-rank technique from one factorization of the kernel.

The search needs ||W − Ŵ||_F / ||W||_F for each rank a layer is offered at. Building
each option (a factorization per rank, then composing Ŵ) repeats the same work; here
each kernel is factorized once, at the largest rank asked for, and the errors of the
smaller ranks are read off it:

- SVD: Ŵ_r keeps the r largest singular values, so ||W − Ŵ_r||² = Σ_{i>r} σ_i²
  (Eckart–Young). Exact: the numbers the built options have, up to rounding.
- Tucker-2 (HOSVD): U_in and U_out are the leading left singular vectors of the
  kernel's input- and output-channel unfoldings, the core C = W ×₃ U_inᵀ ×₄ U_outᵀ at
  the largest ranks; a smaller (R1, R2) keeps the leading columns, so its core is the
  leading block of C, and orthonormal factors give ||W − Ŵ||² = ||W||² − ||C_R1,R2||².
  This is the truncated-HOSVD error: an upper bound on the error of the iterated
  Tucker-2 (HOOI) that `Tucker.build` runs from the same starting point. On random
  normal kernels (flat spectra, the worst case) it exceeds the HOOI error by 3-4%
  of it; on trained kernels, whose spectra fall off, by less.

The linear algebra runs on one BLAS thread: these problems are small (matrices of at
most a few thousand rows), and OpenBLAS' threaded eigensolvers spin when the cores are
busy: on 2 shared cores under load, one 512×512 eigh took 12.9 s threaded, 0.23 s on one
thread.

`FACTORIZATIONS` counts the kernels factorized, so tests can tell a cached curve from a
computed one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

FACTORIZATIONS = [0]  # kernels factorized by this module since import (a list: mutable in place)


def svd_errors(matrix: np.ndarray, ranks: Sequence[int]) -> list[float]:
    """||W − W_r||_F / ||W||_F of the best rank-r approximation of `matrix`, for each r in `ranks`.

    The squared singular values are the eigenvalues of the smaller Gram matrix (WᵀW or
    WWᵀ): a symmetric eigenproblem, several times faster than an SVD on a busy machine.
    """
    FACTORIZATIONS[0] += 1
    matrix = np.asarray(matrix, dtype=np.float64)
    with one_blas_thread():
        gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
        energy = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)  # σ², largest first
    total = float((matrix**2).sum())
    # tail[r] = Σ_{i ≥ r} σ_i², summed from the smallest so small tails keep their precision.
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return [_relative(float(tail[min(int(r), len(energy))]), total) for r in ranks]


def tucker2_errors(kernel: np.ndarray, ranks: Sequence[tuple[int, int]]) -> list[float]:
    """||W − Ŵ||_F / ||W||_F of the truncated Tucker-2 (HOSVD) of a (..., Cin, Cout) kernel, per (R1, R2)."""
    FACTORIZATIONS[0] += 1
    kernel = np.asarray(kernel, dtype=np.float64)
    c_in, c_out = kernel.shape[-2:]
    top_in = max(int(r[0]) for r in ranks)
    top_out = max(int(r[1]) for r in ranks)
    flat = kernel.reshape(-1, c_in, c_out)
    with one_blas_thread():
        # The leading left singular vectors of each channel unfolding: eigenvectors of its Gram matrix.
        u_in = _leading(np.tensordot(flat, flat, axes=([0, 2], [0, 2])), top_in)
        u_out = _leading(np.tensordot(flat, flat, axes=([0, 1], [0, 1])), top_out)
        core = np.tensordot(np.tensordot(flat, u_in, axes=([1], [0])), u_out, axes=([1], [0]))  # (taps, R1, R2)
    energy = (core**2).sum(axis=0)
    kept = energy.cumsum(axis=0).cumsum(axis=1)  # kept[a-1, b-1] = ||C[:, :a, :b]||²
    total = float((kernel**2).sum())
    return [_relative(max(total - float(kept[int(r1) - 1, int(r2) - 1]), 0.0), total) for r1, r2 in ranks]


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block's numpy linear algebra on one BLAS thread (unchanged where threadpoolctl is missing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # it comes with scikit-learn in the [full] extra
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _leading(gram: np.ndarray, count: int) -> np.ndarray:
    """The `count` leading eigenvectors of a symmetric positive semi-definite matrix, as columns."""
    _, vectors = np.linalg.eigh(gram)
    return vectors[:, ::-1][:, :count]


def _relative(squared_error: float, squared_norm: float) -> float:
    if squared_norm <= 0.0:
        return float(np.sqrt(squared_error))
    return float(np.sqrt(squared_error / squared_norm))
