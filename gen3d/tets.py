"""Deformable tetrahedral grids and differentiable marching tetrahedra (DMTet, Shen et al. 2021).

A cube grid over a box, each cube split into six tetrahedra that share its main diagonal (the
Freudenthal / Kuhn split: every cube is split the same way, so neighbouring cubes' faces match
and the tetrahedra fill the box without gaps). Each grid vertex holds an SDF value (negative
inside, as gen3d's surfaces) and an offset bounded to a fraction of a cell; marching tetrahedra
turns them into a triangle mesh whose vertices sit on the tetrahedra's edges where the SDF
crosses 0, linearly interpolated, so the mesh is differentiable w.r.t. the SDF values and the
vertex positions. Faces are wound so their normals point from the inside to the outside.

kaolin and threestudio ship marching tetrahedra for CUDA-era installs (and kaolin's tet grids as
files); this module writes the same algorithm in plain torch, with the grid generated here, so
it runs wherever torch does and needs no downloaded grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import torch

# The six edges of a tetrahedron (its vertices 0..3), as pairs.
TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
# Marching-tetrahedra cases, by which vertices are inside (bit k: vertex k): the triangles, as
# indices into TET_EDGES (DMTet's table; -1 pads). Winding is fixed geometrically afterwards.
TRIANGLES = torch.tensor([
    [-1, -1, -1, -1, -1, -1], [1, 0, 2, -1, -1, -1], [4, 0, 3, -1, -1, -1], [1, 4, 2, 1, 3, 4],
    [3, 1, 5, -1, -1, -1], [2, 3, 0, 2, 5, 3], [1, 4, 0, 1, 5, 4], [4, 2, 5, -1, -1, -1],
    [4, 5, 2, -1, -1, -1], [4, 1, 0, 4, 5, 1], [3, 2, 0, 3, 5, 2], [1, 3, 5, -1, -1, -1],
    [4, 1, 2, 4, 3, 1], [3, 0, 4, -1, -1, -1], [2, 0, 1, -1, -1, -1], [-1, -1, -1, -1, -1, -1]])
TRIANGLE_COUNT = torch.tensor([0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0])


def cube_tets() -> torch.Tensor:
    """[6, 4] the six tetrahedra of a unit cube, as corner offsets ``(x, y, z)`` bits packed x*4+y*2+z:
    each runs from corner 000 to 111 along the axes in one order."""
    tets = []
    for order in permutations(range(3)):
        corner, path = [0, 0, 0], [0]
        for axis in order:
            corner[axis] = 1
            path.append(corner[0] * 4 + corner[1] * 2 + corner[2])
        tets.append(path)
    return torch.tensor(tets)


@dataclass
class TetGrid:
    """Tetrahedra over a subset of a cube grid's cells: vertex positions [V,3] and tets [T,4]."""

    positions: torch.Tensor
    tets: torch.Tensor
    cell: float  # the cube's edge (the box's longest side / resolution)
    grid_index: torch.Tensor  # [V] each vertex's flat index in the full (r+1)^3 lattice


def lattice(aabb: torch.Tensor, resolution: int) -> tuple[torch.Tensor, float]:
    """The (r+1)^3 grid vertices [(r+1)^3, 3] of cubic cells over ``aabb`` (centred, the box's
    longest side split into ``resolution`` cells), and the cell size."""
    low, high = aabb[:3], aabb[3:]
    cell = float((high - low).max()) / resolution
    centre = (low + high) / 2
    axis = (torch.arange(resolution + 1, device=aabb.device, dtype=torch.float32) - resolution / 2) * cell
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return grid + centre, cell


def tet_grid(aabb: torch.Tensor, resolution: int, cells: torch.Tensor | None = None) -> TetGrid:
    """Six tetrahedra in each of the cube grid's cells that ``cells`` [r,r,r] marks (all by default),
    with only the vertices they use."""
    r = resolution
    points, cell = lattice(aabb, r)
    device = aabb.device
    if cells is None:
        cells = torch.ones(r, r, r, dtype=torch.bool, device=device)
    ijk = cells.nonzero()  # [C, 3]
    base = (ijk[:, 0] * (r + 1) + ijk[:, 1]) * (r + 1) + ijk[:, 2]
    offsets = torch.tensor([(a * (r + 1) + b) * (r + 1) + c for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                           device=device)
    corners = base[:, None] + offsets[None]  # [C, 8]
    tets = corners[:, cube_tets().to(device)].reshape(-1, 4)  # [6C, 4] lattice indices
    used, tets = torch.unique(tets, return_inverse=True)
    return TetGrid(points[used], tets.reshape(-1, 4), cell, used)


@dataclass
class TetMesh:
    """What marching tetrahedra made: vertices [M,3] and faces [K,3], plus, per vertex, the
    grid edge it lies on ([M,2] grid vertex indices, inside one first) and its position along it
    (``weight`` [M]: 0 at the first end), to carry other per-vertex values over the same way."""

    verts: torch.Tensor
    faces: torch.Tensor
    edges: torch.Tensor
    weight: torch.Tensor


@dataclass
class TetEdges:
    """A grid's edges, once: ``pairs`` [E, 2] (vertex indices) and ``of_tet`` [T, 6] (each
    tetrahedron's edges in TET_EDGES order, as rows of ``pairs``). The grid's topology never
    changes, so a loop computes this once instead of finding the edges every extraction."""

    pairs: torch.Tensor
    of_tet: torch.Tensor


def tet_edges(tets: torch.Tensor, vertices: int) -> TetEdges:
    pairs = tets[:, TET_EDGES.to(tets.device)]  # [T, 6, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    keys = torch.minimum(a, b) * vertices + torch.maximum(a, b)
    unique, of_tet = torch.unique(keys.reshape(-1), return_inverse=True)
    return TetEdges(torch.stack([unique // vertices, unique % vertices], dim=1), of_tet.reshape(-1, 6))


def marching_tets(positions: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor,
                  edges: TetEdges | None = None) -> TetMesh:
    """The surface sdf = 0 (negative inside) of a tetrahedral grid: differentiable w.r.t.
    ``positions`` [V,3] and ``sdf`` [V]; faces wound with outward normals. ``edges``: the
    grid's :func:`tet_edges`, when the caller keeps them."""
    device = positions.device
    with torch.no_grad():
        inside = sdf < 0
        inside_t = inside[tets]  # [T, 4]
        count = inside_t.sum(dim=1)
        crossed = (count > 0) & (count < 4)
        if edges is None:
            edges = tet_edges(tets[crossed], len(positions))
            edge_of = edges.of_tet
        else:
            edge_of = edges.of_tet[crossed]
        tets, inside_t = tets[crossed], inside_t[crossed]
        lo, hi = edges.pairs[:, 0], edges.pairs[:, 1]
        crossing = inside[lo] != inside[hi]
        vertex_of_edge = torch.full_like(lo, -1)
        vertex_of_edge[crossing] = torch.arange(int(crossing.sum()), device=device)
        # Each surface vertex's edge, its inside end first.
        first = torch.where(inside[lo], lo, hi)[crossing]
        second = torch.where(inside[lo], hi, lo)[crossing]
        case = (inside_t.long() * (2 ** torch.arange(4, device=device))).sum(dim=1)
        table, counts = TRIANGLES.to(device)[case], TRIANGLE_COUNT.to(device)[case]
        edge_vertex = vertex_of_edge[edge_of].reshape(-1, 6)
        one = torch.gather(edge_vertex[counts == 1], 1, table[counts == 1][:, :3]).reshape(-1, 3)
        two = torch.gather(edge_vertex[counts == 2], 1, table[counts == 2][:, :6]).reshape(-1, 3)
        faces = torch.cat([one, two])
        face_tet = torch.cat([(counts == 1).nonzero().squeeze(1), (counts == 2).nonzero().squeeze(1).repeat_interleave(2)])
    s_in, s_out = sdf[first], sdf[second]
    weight = s_in / (s_in - s_out)  # in [0, 1]: where the linear SDF crosses 0 from the inside end
    verts = positions[first] + weight[:, None] * (positions[second] - positions[first])
    with torch.no_grad():
        faces = _wind_outwards(faces, face_tet, verts, positions, tets, inside_t)
    return TetMesh(verts, faces, torch.stack([first, second], dim=1), weight)


def _wind_outwards(faces, face_tet, verts, positions, tets, inside_t) -> torch.Tensor:
    """Flip the faces whose normal points from their tetrahedron's outside corners to its inside ones."""
    if len(faces) == 0:
        return faces
    v = verts[faces]
    normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    corners = positions[tets[face_tet]]  # [K, 4, 3]
    w_in = inside_t[face_tet].float()[..., None]
    centre_in = (corners * w_in).sum(1) / w_in.sum(1)
    centre_out = (corners * (1 - w_in)).sum(1) / (1 - w_in).sum(1)
    flip = (normal * (centre_out - centre_in)).sum(dim=1) < 0
    return torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)


def laplacian_offsets(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] each vertex's offset from the mean of its neighbours (the uniform Laplacian)."""
    i = faces.reshape(-1)
    j = faces.roll(-1, dims=1).reshape(-1)
    src, dst = torch.cat([i, j]), torch.cat([j, i])  # each edge both ways (twice on a closed mesh: same mean)
    total = torch.zeros_like(verts).index_add(0, src, verts[dst])
    degree = torch.zeros(len(verts), device=verts.device).index_add(0, src, torch.ones_like(src, dtype=verts.dtype))
    return verts - total / degree.clamp_min(1)[:, None]


def laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared uniform-Laplacian offset |v - mean(neighbours)|^2 over the mesh's vertices."""
    if len(faces) == 0:
        return verts.sum() * 0
    return (laplacian_offsets(verts, faces) ** 2).sum(dim=1).mean()


def sdf_sign_loss(sdf: torch.Tensor, edges: torch.Tensor, scale: float) -> torch.Tensor:
    """nvdiffrec's SDF regulariser on the edges the surface crosses: each end's sigmoid(sdf/scale)
    pushed towards the other end's side, so the surface stays where the images need it and no
    sign flips (floaters, inner shells) appear elsewhere."""
    if len(edges) == 0:
        return sdf.sum() * 0
    a, b = sdf[edges[:, 0]] / scale, sdf[edges[:, 1]] / scale
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return bce(a, (b > 0).float()) + bce(b, (a > 0).float())


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] area-weighted vertex normals (unnormalised), differentiable in ``verts``; outward for
    marching_tets' winding."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    face = torch.cross(b - a, c - a, dim=-1)
    return torch.zeros_like(verts).index_add(0, faces.reshape(-1), face.repeat_interleave(3, dim=0))


def normal_laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared normal component of the uniform-Laplacian offset: bumps cost, while where a
    vertex sits along the surface does not (marching tetrahedra place vertices unevenly, and the
    whole Laplacian's pull to even them out moves the surface too)."""
    if len(faces) == 0:
        return verts.sum() * 0
    normals = torch.nn.functional.normalize(vertex_normals(verts.detach(), faces), dim=1)
    return ((laplacian_offsets(verts, faces) * normals).sum(dim=1) ** 2).mean()
