"""Sparse video attention patterns as data.

Patterns describe which (query, key) pairs of *grid* (video) tokens attention keeps; text
tokens outside the grid are always dense and are added by the layer. Everything here is
plain data plus pure functions on tensors: importing it has no side effects.

* :class:`VideoGrid` - the latent patch grid (row-major token order).
* :class:`SlidingTileSparsity` - static 3-D sliding window over tiles (shared or per-head windows).
* :class:`TopMassSparsity` - dynamic, training-free: per query block, the key blocks holding
  ``mass`` of the pooled attention estimate.
* :func:`tile_major_permutation` / :func:`tile_major_inverse_permutation` - token reordering
  that makes tiles contiguous.
* :func:`masked_reference` / :func:`sparsity_error` - exact masked attention and a pattern's
  (density, relative error) on given inputs.
* :class:`AccuracyGate` - a layer's ``sparse_gate=``: the first call of each shape class checks the
  pattern against dense attention on sampled rows and runs dense above a max error.
"""

from usp_attn.sparse.gate import AccuracyGate
from usp_attn.sparse.grid import VideoGrid, tile_major_inverse_permutation, tile_major_permutation
from usp_attn.sparse.patterns import TOKEN_ORDERS, SlidingTileSparsity, SparsityPattern, TopMassSparsity
from usp_attn.sparse.reference import masked_reference, sparsity_error

__all__ = [
    "AccuracyGate",
    "TOKEN_ORDERS",
    "SlidingTileSparsity",
    "SparsityPattern",
    "TopMassSparsity",
    "VideoGrid",
    "masked_reference",
    "sparsity_error",
    "tile_major_inverse_permutation",
    "tile_major_permutation",
]
