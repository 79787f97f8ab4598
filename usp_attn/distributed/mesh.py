"""torch ``DeviceMesh`` interop: build the sequence-parallel state from a mesh, and expose the state as one.

A mesh with dims named ``"ring"`` and ``"ulysses"`` (diffusers' ``ContextParallelConfig`` convention, torchtitan
style; other dims such as ``"dp"`` may come before or after) describes the same layout usp_attn uses: mesh
position ``[ring_rank, ulysses_rank]`` is SP rank ``ring_rank * U + ulysses_rank``, Ulysses groups are the rows,
ring groups the columns. Every ``(ring, ulysses)`` slab of the mesh is one sequence-parallel group.

A ``"cfg"`` dim adds CFG parallelism: every ``(cfg, ring, ulysses)`` slab is one CFG unit, its ``cfg`` index the
CFG rank, so unit position ``cfg_rank * (R * U) + sp_rank`` follows the state's order
(:mod:`usp_attn.distributed.state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["CFG_DIM", "MESH_DIMS", "cfg_partition_of_mesh", "sp_partition_of_mesh", "init_from_device_mesh",
           "build_device_mesh"]

MESH_DIMS = ("ring", "ulysses")
CFG_DIM = "cfg"


def sp_partition_of_mesh(mesh) -> tuple[int, int, list[list[int]]]:
    """``(ulysses_degree, ring_degree, SP groups as lists of global ranks in SP-rank order)`` of ``mesh``."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    missing = [d for d in MESH_DIMS if d not in names]
    if missing:
        raise ValueError(
            f"mesh must have dims named {MESH_DIMS} (size 1 for an unused one), got mesh_dim_names={names or None}"
        )
    ranks = mesh.mesh  # the whole mesh's global ranks
    others = [i for i, n in enumerate(names) if n not in MESH_DIMS]
    order = others + [names.index("ring"), names.index("ulysses")]
    ring, ulysses = ranks.shape[names.index("ring")], ranks.shape[names.index("ulysses")]
    slabs = ranks.permute(order).reshape(-1, ring * ulysses)
    return ulysses, ring, [[int(r) for r in slab] for slab in slabs]


def cfg_partition_of_mesh(mesh) -> tuple[int, list[list[int]]]:
    """``(cfg_degree, CFG units as lists of global ranks, CFG-outermost)`` of a mesh with a ``"cfg"`` dim."""
    names = tuple(mesh.mesh_dim_names)
    inner = (CFG_DIM,) + MESH_DIMS
    order = [i for i, n in enumerate(names) if n not in inner] + [names.index(n) for n in inner]
    size = 1
    for n in inner:
        size *= mesh.mesh.shape[names.index(n)]
    units = mesh.mesh.permute(order).reshape(-1, size)
    return mesh.mesh.shape[names.index(CFG_DIM)], [[int(r) for r in unit] for unit in units]


def init_from_device_mesh(mesh, ulysses_degree, ring_degree, ranks, init, cfg_degree=1, **kwargs):
    """``init_sequence_parallel(mesh=...)``: the layout of ``mesh``; the state's ``device_mesh`` is its SP part.

    ``init`` is :func:`~usp_attn.distributed.state.init_sequence_parallel` (called with the mesh's degrees and
    SP groups); ``ulysses_degree``/``ring_degree``/``cfg_degree`` other than 1 must match the mesh, and ``ranks``
    must be None.
    """
    ulysses, ring, partition = sp_partition_of_mesh(mesh)
    cfg = 1
    if CFG_DIM in tuple(mesh.mesh_dim_names):
        cfg, units = cfg_partition_of_mesh(mesh)
        if cfg > 1:
            partition = units
    for name, given, actual in (("ulysses_degree", ulysses_degree, ulysses), ("ring_degree", ring_degree, ring),
                                ("cfg_degree", cfg_degree, cfg)):
        if given not in (1, actual):
            raise ValueError(f"{name}={given} contradicts the mesh, whose {name.split('_')[0]!r} dim has size {actual}")
    if ranks is not None:
        raise ValueError("pass either mesh or ranks, not both: the mesh already says which ranks form each group")
    state = init(ulysses, ring, ranks=partition, cfg_degree=cfg, **kwargs)
    state._device_mesh = mesh[MESH_DIMS] if len(mesh.mesh_dim_names) > 2 else mesh
    return state


def build_device_mesh(state):
    """A ``DeviceMesh`` with dims ``("ring", "ulysses")`` over ``state``'s SP group, on its existing groups.

    No collective: a dim of size 1 gets a one-rank group created locally.
    """
    from torch.distributed.device_mesh import DeviceMesh

    rank = dist.get_rank()
    groups = []
    for group in (state.ring_group, state.ulysses_group):
        if group is None:
            group = dist.new_group([rank], use_local_synchronization=True)
            state._created_groups.append(group)
        groups.append(group)
    layout = torch.tensor(state.sp_ranks, dtype=torch.int).reshape(state.ring_degree, state.ulysses_degree)
    device_type = "cuda" if dist.get_backend(state.sp_group) == "nccl" else "cpu"
    return DeviceMesh.from_group(groups, device_type, layout, mesh_dim_names=MESH_DIMS)
