"""A differentiable triangle rasteriser with nvdiffrast's interface, in plain torch for the CPU.

Three functions, as nvdiffrast's (``nvdiffrast.torch``) and with the same tensors:

- :func:`rasterize` ``(pos [B,V,4] clip space, tri [F,3], (H, W)) -> rast [B,H,W,4]``: per pixel
  ``(u, v, z/w, triangle_id + 1)``, 0 where no triangle covers the pixel centre. ``u, v`` are the
  perspective-correct barycentrics of the triangle's first two vertices (the third gets
  ``1 - u - v``). Which triangle a pixel sees (the z-buffer) is discrete and has no gradient;
  ``u, v`` are differentiable w.r.t. the vertex positions.
- :func:`interpolate` ``(attr [V,C] or [B,V,C], rast, tri) -> [B,H,W,C]``: vertex attributes at
  the pixels, differentiable w.r.t. both the attributes and (through ``u, v``) the positions.
- :func:`antialias` ``(color [B,H,W,C], rast, pos, tri) -> [B,H,W,C]``: nvdiffrast's analytic
  antialiasing (Laine et al. 2020, "Modular primitives for high-performance differentiable
  rendering"): where a silhouette edge passes between two neighbouring pixel centres, the
  pixel it cuts into is blended with its neighbour by how far the edge reaches past the middle.
  The blend weight depends on where the edge crosses, so a loss on the image moves silhouette
  vertices: the gradient that a z-buffer alone cannot give.

Pixel ``(row i, column j)`` has its centre at NDC ``x = 2 (j + 0.5) / W - 1``, ``y = 2 (i + 0.5) / H - 1``
(nvdiffrast's convention): :func:`clip_matrices` builds projections for gen3d's cameras whose row
0 is the image's top, so the same matrices and images serve both paths.

On CUDA, when ``nvdiffrast`` is importable, the three functions call it instead (the same
signatures and outputs); ``GEN3D_RASTER=torch`` keeps the torch path there. :func:`backend`
says which runs. We wrote the CPU path ourselves because no maintained CPU rasteriser offers
differentiable barycentrics and silhouette gradients to torch (nvdiffrast and kaolin's are CUDA,
pytorch3d's CPU path is far slower per face and not installable here).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from .cameras import Cameras

EMPTY_KEY = torch.iinfo(torch.int64).max
MAX_CANDIDATES = 1 << 22  # (pixel, triangle) pairs tested at once: bounds the memory of one chunk
WALK = 8  # triangles antialias walks across between two pixel centres (a fine mesh's are sub-pixel)


# --- the optional CUDA path ----------------------------------------------------------------


@lru_cache(maxsize=1)
def _nvdiffrast():
    try:
        import nvdiffrast.torch as dr  # optional: pip install nvdiffrast (CUDA only)
    except ImportError:
        return None
    return dr


@lru_cache(maxsize=4)
def _cuda_context(device: torch.device):
    return _nvdiffrast().RasterizeCudaContext(device=device)


def backend(device: torch.device | str) -> str:
    """``nvdiffrast-cuda`` where it runs (a CUDA device with nvdiffrast installed), else ``torch``."""
    use = torch.device(device).type == "cuda" and os.environ.get("GEN3D_RASTER", "") != "torch"
    return "nvdiffrast-cuda" if use and _nvdiffrast() is not None else "torch"


# --- projection ----------------------------------------------------------------------------


def clip_matrices(cameras: Cameras, near: float = 0.05, far: float = 100.0) -> torch.Tensor:
    """[N, 4, 4] world -> clip matrices of gen3d's pinhole cameras (OpenGL axes), with NDC y
    growing down the image so that rast's row 0 is the image's top row."""
    w, h = cameras.width, cameras.height
    n = len(cameras)
    proj = torch.zeros(n, 4, 4, dtype=cameras.c2w.dtype, device=cameras.c2w.device)
    proj[:, 0, 0] = 2 * cameras.fx / w
    proj[:, 0, 2] = -(2 * cameras.cx / w - 1)
    proj[:, 1, 1] = -2 * cameras.fy / h
    proj[:, 1, 2] = -(2 * cameras.cy / h - 1)
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2 * far * near / (far - near)
    proj[:, 3, 2] = -1
    return proj @ torch.linalg.inv(cameras.c2w)


def project(verts: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """World points [V, 3] -> clip coordinates [B, V, 4] under each of ``matrices`` [B, 4, 4]."""
    homogeneous = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)
    return torch.einsum("bij,vj->bvi", matrices.to(verts.dtype), homogeneous)


def _screen(pos: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip [B,V,4] -> pixel-unit screen positions [B,V,2] (centre of pixel j at j + 0.5) and z/w [B,V]."""
    w = pos[..., 3].clamp_min(1e-8)
    scale = pos.new_tensor([width / 2, height / 2])
    return (pos[..., :2] / w[..., None] + 1) * scale, pos[..., 2] / w


# --- rasterize -----------------------------------------------------------------------------


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """Rasterise triangles ``tri`` [F,3] of clip-space vertices ``pos`` [B,V,4] (or [V,4]) into
    ``resolution`` (H, W): rast [B,H,W,4] = (u, v, z/w, triangle_id + 1). Triangles with a vertex
    behind the near plane (w <= 0) are skipped, not clipped (our cameras look at objects from
    outside)."""
    pos = pos[None] if pos.dim() == 2 else pos
    height, width = resolution
    if backend(pos.device) != "torch":
        return _nvdiffrast().rasterize(_cuda_context(pos.device), pos.contiguous(), tri.int(), (height, width))[0]
    with torch.no_grad():
        face = visible_faces(pos.detach(), tri, height, width)  # [B*H*W], -1 where empty
    pixel = (face >= 0).nonzero().squeeze(1)
    batch, local = pixel // (height * width), face[pixel] % len(tri)
    screen, z = _screen(pos, height, width)
    corners = tri[local]  # [P, 3]
    s = screen[batch[:, None], corners]  # [P, 3, 2], differentiable
    p = torch.stack([(pixel % width).to(pos.dtype) + 0.5, ((pixel // width) % height).to(pos.dtype) + 0.5], dim=1)
    l0, l1, l2 = _barycentrics(s, p)
    inv_w = 1 / pos[..., 3][batch[:, None], corners].clamp_min(1e-8)  # perspective correction
    q0, q1, q2 = l0 * inv_w[:, 0], l1 * inv_w[:, 1], l2 * inv_w[:, 2]
    total = q0 + q1 + q2
    zc = z[batch[:, None], corners]
    depth = l0 * zc[:, 0] + l1 * zc[:, 1] + l2 * zc[:, 2]
    values = torch.stack([q0 / total, q1 / total, depth, (local + 1).to(pos.dtype)], dim=1)
    rast = pos.new_zeros(len(pos) * height * width, 4)
    rast = rast.index_put((pixel,), values)
    return rast.reshape(len(pos), height, width, 4)


def _barycentrics(s: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen-space barycentrics of points ``p`` [P,2] in triangles ``s`` [P,3,2]."""
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    area = _cross(b - a, c - a)
    area = torch.where(area.abs() < 1e-12, torch.full_like(area, 1e-12), area)
    l0 = _cross(b - p, c - p) / area
    l1 = _cross(c - p, a - p) / area
    return l0, l1, 1 - l0 - l1


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def visible_faces(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The z-buffer: for each pixel of each image (flat [B*H*W]) the index ``b * F + face`` of the
    nearest triangle covering its centre, -1 where none does.

    Every triangle is tested at the pixel centres of its bounding box only, all triangles at
    once (in chunks of at most MAX_CANDIDATES pairs); each (pixel, triangle) hit becomes one
    int64 key, depth bits above the face index, and a scatter-min per pixel keeps the nearest."""
    b, f = len(pos), len(tri)
    screen, z = _screen(pos, height, width)
    s = screen[:, tri].reshape(b * f, 3, 2)
    zf = z[:, tri].reshape(b * f, 3)
    w_ok = (pos[..., 3][:, tri] > 1e-6).all(dim=2).reshape(-1)
    lo = (s.amin(dim=1) - 0.5).ceil().long()
    hi = (s.amax(dim=1) - 0.5).floor().long()
    lo[:, 0].clamp_(min=0), lo[:, 1].clamp_(min=0)
    hi[:, 0].clamp_(max=width - 1), hi[:, 1].clamp_(max=height - 1)
    size = (hi - lo + 1).clamp_min(0)
    area = _cross(s[:, 1] - s[:, 0], s[:, 2] - s[:, 0])
    count = torch.where(w_ok & (area.abs() > 1e-12), size[:, 0] * size[:, 1], torch.zeros_like(size[:, 0]))
    # Most triangles of a fine mesh cover no pixel centre: only the others are planed and scanned.
    some = (count > 0).nonzero().squeeze(1)
    if len(some) == 0:
        return torch.full((b * height * width,), -1, dtype=torch.long, device=pos.device)
    count, lo, size = count[some], lo[some], size[some]
    plane = _planes(s[some], zf[some], area[some])
    batch = some // f  # each kept triangle's image
    zbuf = torch.full((b * height * width,), EMPTY_KEY, dtype=torch.int64, device=pos.device)
    ends = count.cumsum(0)
    first = 0
    while first < len(count):
        limit = (ends[first - 1] if first else ends.new_zeros(())) + MAX_CANDIDATES
        last = max(int(torch.searchsorted(ends, limit.reshape(1), right=True)), first + 1)
        _scan(zbuf, first, last, count, lo, size, plane, batch, height, width)
        first = last
    hit = zbuf != EMPTY_KEY
    return torch.where(hit, some[(zbuf & 0xFFFFFFFF).clamp_max(max(len(some) - 1, 0))], torch.full_like(zbuf, -1))


def _planes(s: torch.Tensor, z: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Per triangle, l0, l1 and z as affine functions of the pixel position: [T, 3 functions, 3 coefficients]."""
    area = torch.where(area.abs() < 1e-12, torch.ones_like(area), area)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]

    def edge(p, q):  # cross(p - x, q - x) = coefficients of (x, y, 1)
        return torch.stack([p[:, 1] - q[:, 1], q[:, 0] - p[:, 0], p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]], dim=1)

    l0, l1 = edge(b, c) / area[:, None], edge(c, a) / area[:, None]
    l2 = -l0 - l1
    l2[:, 2] += 1
    depth = l0 * z[:, 0:1] + l1 * z[:, 1:2] + l2 * z[:, 2:3]
    return torch.stack([l0, l1, depth], dim=1)


def _scan(zbuf, first, last, count, lo, size, plane, batch, height, width) -> None:
    """Test triangles first..last-1 at their bounding boxes' pixel centres; min their keys into zbuf."""
    n = count[first:last]
    total = int(n.sum())
    if total == 0:
        return
    tri = torch.repeat_interleave(torch.arange(first, last, device=n.device), n)
    start = torch.repeat_interleave(n.cumsum(0) - n, n)
    local = torch.arange(total, device=n.device) - start
    nx = size[tri, 0]
    x = lo[tri, 0] + local % nx
    y = lo[tri, 1] + local // nx
    px, py = x.to(plane.dtype) + 0.5, y.to(plane.dtype) + 0.5
    coef = plane[tri]  # [K, 3, 3]
    values = coef[..., 0] * px[:, None] + coef[..., 1] * py[:, None] + coef[..., 2]
    l0, l1, depth = values.unbind(1)
    inside = (l0 >= 0) & (l1 >= 0) & (l0 + l1 <= 1) & (depth >= -1) & (depth <= 1)
    tri, x, y, depth = tri[inside], x[inside], y[inside], depth[inside]
    # depth + 2 lies in [1, 3]: positive floats order as their bit patterns do.
    bits = (depth.float() + 2).contiguous().view(torch.int32).long()
    key = (bits << 32) | tri
    zbuf.scatter_reduce_(0, (batch[tri] * height + y) * width + x, key, "amin")


# --- interpolate ---------------------------------------------------------------------------


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Vertex attributes ``attr`` [V,C] (or [B,V,C]) at every pixel of ``rast``: [B,H,W,C], 0 where empty."""
    if backend(rast.device) != "torch":
        batched = attr if attr.dim() == 3 else attr[None]  # nvdiffrast broadcasts a [1, V, C] batch
        return _nvdiffrast().interpolate(batched.contiguous(), rast, tri.int())[0]
    b, h, w, _ = rast.shape
    flat = rast.reshape(-1, 4)
    pixel = (flat[:, 3] > 0).nonzero().squeeze(1)
    face = flat[pixel, 3].long() - 1
    corners = tri[face]
    values = attr[corners] if attr.dim() == 2 else attr[(pixel // (h * w))[:, None], corners]  # [P, 3, C]
    u, v = flat[pixel, 0:1], flat[pixel, 1:2]
    mixed = u * values[:, 0] + v * values[:, 1] + (1 - u - v) * values[:, 2]
    out = attr.new_zeros(b * h * w, attr.shape[-1]).index_put((pixel,), mixed)
    return out.reshape(b, h, w, -1)


# --- antialias -----------------------------------------------------------------------------


def edge_neighbors(tri: torch.Tensor) -> torch.Tensor:
    """[F, 3]: the triangle across each edge k (vertices k, k+1) of each triangle, -1 on a boundary
    (nvdiffrast's topology hash plays this part)."""
    f = len(tri)
    a, b = tri, tri.roll(-1, dims=1)
    key = (torch.minimum(a, b) * (int(tri.max()) + 1) + torch.maximum(a, b)).reshape(-1)
    order = key.argsort()
    sorted_key = key[order]
    same = (sorted_key[1:] == sorted_key[:-1]).nonzero().squeeze(1)
    neighbors = torch.full((f * 3,), -1, dtype=torch.long, device=tri.device)
    neighbors[order[same]] = order[same + 1] // 3
    neighbors[order[same + 1]] = order[same] // 3
    return neighbors.reshape(f, 3)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology: torch.Tensor | None = None) -> torch.Tensor:
    """Blend ``color`` [B,H,W,C] across silhouette edges (see the module's docstring); ``topology``:
    :func:`edge_neighbors` of ``tri``, when the caller keeps it between calls."""
    pos = pos[None].expand(len(color), -1, -1) if pos.dim() == 2 else pos
    if backend(color.device) != "torch":
        return _nvdiffrast().antialias(color.contiguous(), rast, pos.contiguous(), tri.int())
    b, h, w, c = color.shape
    neighbors = edge_neighbors(tri) if topology is None else topology
    screen, _ = _screen(pos, h, w)
    with torch.no_grad():
        s = screen.detach()[:, tri]  # [B, F, 3, 2]
        facing = _cross(s[:, :, 1] - s[:, :, 0], s[:, :, 2] - s[:, :, 0]) > 0  # [B, F]
        other = facing.gather(1, neighbors.clamp_min(0).reshape(1, -1).expand(b, -1)).reshape(b, -1, 3)
        silhouette = (neighbors[None] < 0) | (other != facing[..., None])  # [B, F, 3]
    face = rast[..., 3].long() - 1
    depth = torch.where(face >= 0, rast[..., 2].detach(), torch.full_like(rast[..., 2], float("inf")))
    flat = color.reshape(-1, c)
    deltas, targets = [], []
    for axis in (2, 1):  # horizontal neighbours (along W), then vertical (along H)
        found = _edge_blends(axis, face, depth, screen, tri, silhouette, flat, h, w, neighbors)
        if found is not None:
            targets.append(found[0])
            deltas.append(found[1])
    if not targets:
        return color
    out = flat.index_add(0, torch.cat(targets), torch.cat(deltas))
    return out.reshape(b, h, w, c)


def _edge_blends(axis, face, depth, screen, tri, silhouette, flat, h, w, neighbors):
    """Pixel pairs next to each other along ``axis`` that a silhouette edge separates: the pixel
    to change and the colour change (differentiable through the edge's crossing point).

    From the front pixel's triangle the segment to the other centre is walked across triangles
    (through non-silhouette edges, at most WALK of them) to the silhouette edge it crosses: on a
    fine mesh the triangle that holds the silhouette often covers no pixel centre itself."""
    b = face.shape[0]
    index = torch.arange(b * h * w, device=face.device).reshape(b, h, w)
    first = index.narrow(axis, 0, (w if axis == 2 else h) - 1).reshape(-1)
    second = index.narrow(axis, 1, (w if axis == 2 else h) - 1).reshape(-1)
    fface, fdepth = face.reshape(-1), depth.reshape(-1)
    differ = (fface[first] != fface[second]).nonzero().squeeze(1)
    p, q = first[differ], second[differ]
    p_front = fdepth[p] < fdepth[q]
    front, back = torch.where(p_front, p, q), torch.where(p_front, q, p)
    keep = fface[front] >= 0
    front, back = front[keep], back[keep]
    if len(front) == 0:
        return None
    batch = front // (h * w)
    centre = lambda i: torch.stack([(i % w).to(screen.dtype) + 0.5, ((i // w) % h).to(screen.dtype) + 0.5], dim=1)
    pf, pb = centre(front), centre(back)
    with torch.no_grad():
        reached, k = torch.zeros_like(front), torch.zeros_like(front)
        found = torch.zeros_like(front, dtype=torch.bool)
        rows = torch.arange(len(front), device=front.device)  # the pairs still walking
        current = fface[front]
        t_prev = torch.zeros(len(front), dtype=screen.dtype, device=screen.device)
        for _ in range(WALK):
            ef, eb = _edge_values(screen.detach(), tri, batch[rows], current, pf[rows], pb[rows])
            leaving = eb < ef  # edges the segment moves outwards across
            t_all = torch.where(leaving, ef / (ef - eb).clamp_min(1e-12), torch.full_like(ef, 2.0))
            t_all = torch.where(t_all >= t_prev[:, None] - 1e-6, t_all, torch.full_like(ef, 2.0))
            k_now = t_all.argmin(dim=1)
            t_exit = t_all.gather(1, k_now[:, None]).squeeze(1)
            inside = t_exit <= 1  # else the other centre lies in this triangle: no edge between
            hit = inside & silhouette[batch[rows], current, k_now]
            found[rows[hit]] = True
            k[rows[hit]], reached[rows[hit]] = k_now[hit], current[hit]
            nxt = neighbors[current, k_now]
            go = inside & ~hit & (nxt >= 0)
            rows, current, t_prev = rows[go], nxt[go], t_exit[go]
            if len(rows) == 0:
                break
        direction = _edge_vector(screen.detach(), tri, batch, reached, k).abs()
        # Each edge is handled by the pairs across it: a steep edge by horizontal pairs.
        steep = direction[:, 1] >= direction[:, 0] if axis == 2 else direction[:, 0] > direction[:, 1]
        ok = found & steep
    rows = ok.nonzero().squeeze(1)
    if len(rows) == 0:
        return None
    ef, eb = _edge_values(screen, tri, batch[rows], reached[rows], pf[rows], pb[rows])
    pick = torch.arange(len(rows), device=rows.device)
    a, bb = ef[pick, k[rows]], eb[pick, k[rows]]
    t = (a / (a - bb)).clamp(0, 1)  # where the edge crosses, from the front centre (1 = the back centre)
    front, back = front[rows], back[rows]
    cf, cb = flat[front], flat[back]
    into_back = t > 0.5
    weight = torch.where(into_back, t - 0.5, 0.5 - t)[:, None]
    target = torch.where(into_back, back, front)
    delta = torch.where(into_back[:, None], cf - cb, cb - cf) * weight
    return target, delta


def _edge_values(screen, tri, batch, faces, pf, pb):
    """Each triangle's three edge functions (positive inside) at the two pixel centres: [P, 3] each."""
    s = screen[batch[:, None], tri[faces]]  # [P, 3, 2]
    start, end = s, s.roll(-1, dims=1)  # edge k runs from vertex k to vertex k+1
    sign = torch.sign(_cross(s[:, 1] - s[:, 0], s[:, 2] - s[:, 0]))[:, None]
    return sign * _cross(end - start, pf[:, None] - start), sign * _cross(end - start, pb[:, None] - start)


def _edge_vector(screen, tri, batch, faces, k):
    s = screen[batch[:, None], tri[faces]]
    rows = torch.arange(len(k), device=k.device)
    return s.roll(-1, dims=1)[rows, k] - s[rows, k]
