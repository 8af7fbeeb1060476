"""Rows added into a table at given row indices, repeats accumulated in index order: what
`np.add.at(table, ids, rows)` computes for a 2-D table, with the same result bit for bit
(numpy's add.at takes ~12 ns per element on such rows; this loop is bound by memory)."""

from __future__ import annotations

import numba


@numba.njit(cache=True, error_model="numpy")
def _scatter_add_rows(table, ids, rows):
    n = table.shape[0]
    for i in range(ids.shape[0]):
        k = ids[i]
        if k < 0:
            k += n
        t, r = table[k], rows[i]
        for j in range(t.shape[0]):
            t[j] += r[j]


def scatter_add_rows(table, ids, rows) -> None:
    """table[ids[i]] += rows[i] for i in order; ids in [-n, n) as np.add.at takes them."""
    n = table.shape[0]
    if ids.size and (int(ids.min()) < -n or int(ids.max()) >= n):
        raise IndexError(f"row index out of range for a table of {n} rows")
    _scatter_add_rows(table, ids, rows)


def applies(table, ids, rows) -> bool:
    """Shapes and types this kernel takes (the dtypes being checked by kernels.applies)."""
    return (table.ndim == 2 and ids.ndim == 1 and ids.dtype.kind in "iu"
            and rows.shape == (ids.shape[0], table.shape[1]))
