"""DeviceMesh interop on 4 gloo ranks: ``init_sequence_parallel(mesh=...)`` takes its layout from a mesh with dims
("ring", "ulysses") (also inside a larger mesh), and every state exposes a matching ``device_mesh``; attention
over the mesh's layout equals the fp64 reference."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.helpers.multiproc import run_cases
from tests.helpers.state import reset_usp_attn_state


def _group_ranks(mesh, dim):
    return tuple(dist.get_process_group_ranks(mesh.get_group(dim)))


def state_from_2d_mesh() -> dict:
    import usp_attn
    from torch.distributed.device_mesh import init_device_mesh

    from tests.helpers.reference import reference_attention

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    state = usp_attn.init_sequence_parallel(mesh=mesh)
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 11, 3, 8, generator=gen) for _ in range(3))
        out = usp_attn.gather_sequence(usp_attn.USPAttention(3, 8)(*(usp_attn.shard_sequence(t) for t in (q, k, v))))
        ref = reference_attention(q.double(), k.double(), v.double())
        return dict(degrees=(state.ulysses_degree, state.ring_degree), same_mesh=state.device_mesh is mesh,
                    ulysses=(state.ulysses_ranks, _group_ranks(mesh, "ulysses")),
                    ring=(state.ring_ranks, _group_ranks(mesh, "ring")),
                    error=(out.double() - ref).abs().max().item())
    finally:
        usp_attn.destroy_sequence_parallel()


def state_from_3d_mesh() -> dict:
    import usp_attn
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "ring", "ulysses"))
    state = usp_attn.init_sequence_parallel(mesh=mesh)
    try:
        return dict(degrees=(state.ulysses_degree, state.ring_degree), sp_ranks=state.sp_ranks,
                    mesh_dims=state.device_mesh.mesh_dim_names, mesh_ranks=state.device_mesh.mesh.flatten().tolist())
    finally:
        usp_attn.destroy_sequence_parallel()


def mesh_of_plain_state(ulysses: int, ring: int) -> dict:
    import usp_attn

    state = usp_attn.init_sequence_parallel(ulysses, ring)
    try:
        mesh = state.device_mesh
        return dict(dims=mesh.mesh_dim_names, shape=tuple(mesh.mesh.shape),
                    ulysses=(state.ulysses_ranks or (dist.get_rank(),), _group_ranks(mesh, "ulysses")),
                    ring=(state.ring_ranks or (dist.get_rank(),), _group_ranks(mesh, "ring")))
    finally:
        usp_attn.destroy_sequence_parallel()


def bad_meshes() -> list[str]:
    import usp_attn
    from torch.distributed.device_mesh import init_device_mesh

    messages = []
    for mesh, kwargs in ((init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")), {}),
                         (init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses")), {"ulysses_degree": 4}),
                         (init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses")), {"ranks": [0, 1, 2, 3]})):
        with pytest.raises(ValueError) as info:
            usp_attn.init_sequence_parallel(mesh=mesh, **kwargs)
        messages.append(str(info.value))
        assert usp_attn.get_sequence_parallel_state() is None
    return messages


CASES = [state_from_2d_mesh, state_from_3d_mesh, functools.partial(mesh_of_plain_state, 4, 1),
         functools.partial(mesh_of_plain_state, 1, 4), functools.partial(mesh_of_plain_state, 2, 2), bad_meshes]


@pytest.fixture(scope="module")
def group():
    return run_cases(4, CASES, setup=reset_usp_attn_state, timeout=200)


def test_state_from_2d_mesh_shares_its_layout(group):
    for res in group.check(state_from_2d_mesh):
        assert res["degrees"] == (2, 2) and res["same_mesh"], res
        assert res["ulysses"][0] == res["ulysses"][1] and res["ring"][0] == res["ring"][1], res
        assert res["error"] < 1e-5, res  # fp32 vs fp64 reference


def test_state_from_mesh_with_a_data_parallel_dim(group):
    results = group.check(state_from_3d_mesh)
    assert [r["sp_ranks"] for r in results] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    for res in results:
        assert res["degrees"] == (2, 1) and res["mesh_dims"] == ("ring", "ulysses")
        assert tuple(res["mesh_ranks"]) == res["sp_ranks"]


@pytest.mark.parametrize("u,r", [(4, 1), (1, 4), (2, 2)])
def test_every_state_exposes_a_matching_mesh(group, u, r):
    for res in group.check(functools.partial(mesh_of_plain_state, u, r)):
        assert res["dims"] == ("ring", "ulysses") and res["shape"] == (r, u), res
        assert res["ulysses"][0] == res["ulysses"][1] and res["ring"][0] == res["ring"][1], res


def test_bad_meshes_are_refused_clearly(group):
    missing, contradicts, both = group.check(bad_meshes)[0]
    assert "mesh must have dims named ('ring', 'ulysses')" in missing and "('a', 'b')" in missing
    assert "ulysses_degree=4 contradicts the mesh" in contradicts
    assert "either mesh or ranks" in both
