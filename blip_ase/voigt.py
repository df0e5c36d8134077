"""ASE's Voigt order for stress, the one place it is written: ``xx yy zz yz xz xy``.

Both functions take numpy arrays or torch tensors with any leading dimensions.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # np.ndarray or torch.Tensor

ROWS, COLUMNS = (0, 1, 2, 1, 0, 0), (0, 1, 2, 2, 2, 1)  # matrix entries of the six Voigt components
_MATRIX_OF_VOIGT = (0, 5, 4, 5, 1, 3, 4, 3, 2)  # row-major (3, 3) entries as Voigt indices


def matrix_to_voigt(matrix: Array) -> Array:
    """``(..., 3, 3)`` -> ``(..., 6)``: the upper triangle in ASE Voigt order (no symmetrisation)."""
    return matrix[..., list(ROWS), list(COLUMNS)]


def voigt_to_matrix(voigt: Array) -> Array:
    """``(..., 6)`` in ASE Voigt order -> the symmetric ``(..., 3, 3)`` matrix."""
    full = voigt[..., list(_MATRIX_OF_VOIGT)]
    return full.reshape(*full.shape[:-1], 3, 3)
