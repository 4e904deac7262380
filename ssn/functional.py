"""Sparse probability mappings: sparsemax and SparsestMax.

Both map logits ``z`` (any shape, probabilities along ``dim``) to points of the probability
simplex. They are exact, batched over every other dimension and differentiable.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["sparsemax", "sparsestmax", "authors_sparsestmax", "max_radius", "PROJECTIONS"]

PROJECTIONS = ("exact", "authors")

# Inputs of at most this many elements on the CPU take the scalar path (see _sparsestmax_row).
SMALL_CPU = 64
_force_batched = False  # tests flip this to check the batched path on small inputs too


def max_radius(k: int) -> float:
    """Distance from the simplex centre ``1/K`` to any vertex: ``sqrt((K - 1) / K)``.

    At this radius the only feasible points of SparsestMax are the vertices (one-hot vectors).
    """
    if k < 2:
        raise ValueError(f"need at least 2 categories, got {k}")
    return math.sqrt((k - 1) / k)


def _compute_dtype(z: Tensor) -> torch.dtype:
    # NOTE: half precision cannot resolve the thresholds reliably; compute in at least float32.
    return torch.float64 if z.dtype == torch.float64 else torch.float32


# NOTE: entries this far below a row's maximum are outside the support of sparsemax (its threshold
# is at least max - 1) and therefore of SparsestMax, whose support is within sparsemax's (pushing
# away from the centre only sparsifies); clamping them keeps every intermediate (cumulative sums,
# squared deviations) in range for any finite input, e.g. float32 logits of 1e8 or 3e38.
_FAR = 8.0


def _finite_rows(z: Tensor) -> tuple[Tensor, Tensor]:
    """``z`` with rows holding a NaN/inf zeroed, and the mask of those rows (no host sync)."""
    bad = ~torch.isfinite(z).all(-1, keepdim=True)
    return z.masked_fill(bad, 0.0), bad


def _nan_rows(p: Tensor, bad: Tensor) -> Tensor:
    return p.masked_fill(bad, math.nan)


def _shift_to_max(z: Tensor) -> Tensor:
    """``z - max(z)``, with entries more than ``_FAR`` below the maximum clamped (see above).

    The projections are invariant to a shift of a row and to moving entries that stay far below
    the maximum, so this changes no result; the Jacobians sum to zero along a row, so it changes
    no gradient either.
    """
    return (z - z.detach().amax(-1, keepdim=True)).clamp_min(-_FAR)


def _sparsemax_threshold(z: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold ``tau`` and support size of sparsemax along the last dim (Martins & Astudillo)."""
    k = z.shape[-1]
    zs, _ = torch.sort(z, dim=-1, descending=True)
    rho = torch.arange(1, k + 1, device=z.device, dtype=z.dtype)
    cumsum = zs.cumsum(-1) - 1
    support = (rho * zs > cumsum).sum(-1, keepdim=True)
    tau = cumsum.gather(-1, support - 1) / support.to(z.dtype)
    return tau, support


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        tau, _ = _sparsemax_threshold(z)
        p = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # Jacobian of a Euclidean projection onto the simplex: on the support S it is
        # I - 1 1^T / |S|, zero elsewhere (entmax's sparsemax backward).
        (p,) = ctx.saved_tensors
        mask = p > 0
        grad = grad.masked_fill(~mask, 0)
        mean = grad.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).to(grad.dtype)
        return torch.where(mask, grad - mean, torch.zeros_like(grad))


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    """Euclidean projection onto the probability simplex.

    Solves: ``argmin_{p >= 0, sum(p) = 1} ||p - z||^2`` along ``dim``.

    Args:
        z: logits, any shape.
        dim: the dimension holding the categories.

    Returns:
        Probabilities of the same shape and dtype as ``z``; a row with a NaN or infinite logit
        maps to a row of NaN (with zero gradient), without a host synchronisation.
    """
    if z.dim() == 0:
        raise ValueError("sparsemax needs at least one dimension of categories")
    zt, bad = _finite_rows(z.movedim(dim, -1).to(_compute_dtype(z)))
    p = _Sparsemax.apply(_shift_to_max(zt))
    return _nan_rows(p, bad).to(z.dtype).movedim(-1, dim)


def _as_radius(radius: float | Tensor, z: Tensor) -> Tensor:
    """Radius as a tensor broadcastable to ``z``'s leading dims, with a trailing 1."""
    if isinstance(radius, Tensor):
        # NOTE: checking a CUDA tensor's sign would sync the device on every call.
        checkable = radius.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and bool((radius < 0).any() | radius.isnan().any()):
            raise ValueError(f"radius must be non-negative, got {radius}")
        r = radius.to(z.dtype)
    else:
        if not radius >= 0:
            raise ValueError(f"radius must be a non-negative number, got {radius!r}")
        r = torch.tensor(float(radius), dtype=z.dtype, device=z.device)
    try:
        torch.broadcast_shapes(r.shape, z.shape[:-1])
    except RuntimeError as e:
        raise ValueError(
            f"radius of shape {tuple(r.shape)} does not broadcast to the batch shape {tuple(z.shape[:-1])}"
        ) from e
    return r.unsqueeze(-1)


def _sparsestmax_forward(z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SparsestMax along the last dim; also returns what the backward needs.

    Candidates: sparsemax(z) when it lies outside the ball; otherwise the minimiser lies on the
    sphere ``||p - u|| = r`` and, by the KKT conditions, has the form ``s * (z - tau)_+``, so its
    support is a top-k set of z. On the top-k face the sphere is a circle centred at the face
    centroid ``1/k`` with radius ``r_k^2 = r^2 - (1/k - 1/K)``, and its point nearest z is
    ``1/k + r_k * w / ||w||``, ``w = z_S - mean(z_S)``. Every k is scored in closed form from
    cumulative sums, and the feasible (non-negative) candidate nearest z is kept.

    Returns:
        p, and what the backward needs: the support mask; per row the Jacobian scale ``r_k/||w||``
        (1 for sparsemax and on a flat face, 0 where p is one-hot); the unit direction ``w/||w||``
        of the sphere Jacobian (0 for sparsemax and flat faces); and ``dp/dr``.
    """
    kk = z.shape[-1]
    dt = z.dtype
    eps = torch.finfo(dt).eps
    r = r.expand(z.shape[:-1] + (1,))
    zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
    k = torch.arange(1, kk + 1, device=z.device, dtype=dt)
    cs = zs.cumsum(-1)
    mean = cs / k
    # NOTE: the scatter of the top-k around their mean, accumulated Welford-style: every term is
    # non-negative, so float32 loses nothing to the cancellation of sum(z^2) - k * mean^2.
    prev = torch.cat([zs[..., :1], mean[..., :-1]], dim=-1)
    n2 = (((k - 1) / k) * (zs - prev) ** 2).cumsum(-1)
    norm = n2.sqrt()
    scale = zs.abs().amax(-1, keepdim=True) + 1
    flat = norm <= 4 * kk * eps * scale

    # sparsemax (Martins & Astudillo): support size and threshold from the same sorted arrays
    support = (k * zs > cs - 1).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1) / support.to(dt)
    p_sm = (z - tau).clamp_min(0)
    outside = (p_sm - 1 / kk).norm(dim=-1, keepdim=True) >= r

    # sphere candidates for every k
    rk2 = r**2 - (1 / k - 1 / kk)
    reaches = rk2 >= 0
    rk = rk2.clamp_min(0).sqrt()
    tie_min = torch.where(k > 1, -1 / (k * (k - 1)).clamp_min(1).sqrt(), torch.zeros_like(k))
    lowest = torch.where(flat, tie_min, (zs - mean) / norm.clamp_min(torch.finfo(dt).tiny))
    feasible = reaches & (1 / k + rk * lowest >= -16 * eps)
    tail = (zs**2).flip(-1).cumsum(-1).flip(-1)
    tail = torch.cat([tail[..., 1:], torch.zeros_like(tail[..., :1])], dim=-1)
    dist = k * (1 / k - mean) ** 2 + (rk - torch.where(flat, torch.zeros_like(norm), norm)) ** 2 + tail
    best = dist.masked_fill(~feasible, math.inf).argmin(-1, keepdim=True)

    kb, mb, nb = k.expand_as(zs).gather(-1, best), mean.gather(-1, best), norm.gather(-1, best)
    rkb, flatb = rk.gather(-1, best), flat.gather(-1, best)
    on = torch.arange(kk, device=z.device) < kb
    first = (torch.arange(kk, device=z.device) == 0).to(dt)
    tie = (first - 1 / kb) * on / ((kb - 1) / kb).clamp_min(torch.finfo(dt).tiny).sqrt()
    w = (zs - mb) * on / nb.clamp_min(torch.finfo(dt).tiny)
    direction = torch.where(flatb, tie, w)
    ps = (1 / kb + rkb * direction) * on
    unsort = lambda t: torch.zeros_like(t).scatter(-1, order, t)  # noqa: E731
    p_sp, dir_sp, on_sp = unsort(ps), unsort(direction), unsort(on.to(dt)) > 0

    rmax = max_radius(kk)
    onehot = r >= rmax
    p = torch.where(outside, p_sm, p_sp).clamp_min(0)
    # NOTE: renormalising restores sum-to-one after float rounding without moving any zero; the
    # one-hot case is written exactly (latching relies on it).
    p = p / p.sum(-1, keepdim=True)
    top = torch.zeros_like(z).scatter(-1, order[..., :1], 1.0)
    p = torch.where(onehot, top, p)

    live = ~onehot & (rkb > 0)
    tiny = torch.finfo(dt).tiny
    # NOTE: on a flat face (tied logits, e.g. the uniform initialisation) the argmin is a whole
    # circle and has no derivative; the gradient there is taken as sparsemax's (the centring
    # projection on the support), so training can leave the tie instead of staying on it forever.
    sphere_coef = torch.where(flatb, torch.ones_like(rkb), rkb / nb.clamp_min(tiny))
    coef = torch.where(outside, torch.ones_like(rkb), torch.where(live, sphere_coef, torch.zeros_like(rkb)))
    coef = torch.where(onehot, torch.zeros_like(coef), coef)
    mask = torch.where(outside, p_sm > 0, on_sp)
    dz = torch.where(outside | flatb, torch.zeros_like(dir_sp), dir_sp)
    dr = torch.where(~outside & live, r / rkb.clamp_min(tiny), torch.zeros_like(rkb)) * dir_sp
    return p, mask, coef, dz, dr


def _sparsestmax_row(
    z: list[float], r: float
) -> tuple[list[float], list[float], float, list[float], list[float]]:
    """The same algorithm as ``_sparsestmax_forward`` for one row, in float64 Python scalars.

    NOTE: a layer's ratios are two rows of three logits; on the CPU the batched version's ~70
    tensor ops cost far more in dispatch than this arithmetic (see ``_SparsestMaxScalar``).
    """
    kk = len(z)
    eps = 2.220446049250313e-16
    order = sorted(range(kk), key=lambda i: -z[i])  # stable: ties keep the lower index first
    zs = [z[i] for i in order]
    cs = list(itertools.accumulate(zs))
    zero = [0.0] * kk
    if r >= max_radius(kk):
        p = zero.copy()
        p[order[0]] = 1.0
        return p, p.copy(), 0.0, zero, zero
    support = max(k for k in range(1, kk + 1) if k * zs[k - 1] > cs[k - 1] - 1)
    tau = (cs[support - 1] - 1) / support
    p_sm = [max(v - tau, 0.0) for v in z]
    if math.sqrt(sum((v - 1 / kk) ** 2 for v in p_sm)) >= r:
        return p_sm, [float(v > 0) for v in p_sm], 1.0, zero, zero
    scale = max(abs(v) for v in zs) + 1
    tail = sum(v * v for v in zs)
    n2, prev, best, best_d = 0.0, zs[0], (1, zs[0], 0.0, 0.0, True), math.inf
    for k in range(1, kk + 1):
        x, mean = zs[k - 1], cs[k - 1] / k
        n2 += (k - 1) / k * (x - prev) ** 2
        tail -= x * x
        prev = mean
        rk2 = r * r - (1 / k - 1 / kk)
        if rk2 < 0:
            continue
        rk, norm = math.sqrt(rk2), math.sqrt(max(n2, 0.0))
        flat = norm <= 4 * kk * eps * scale
        lowest = (-1 / math.sqrt(k * (k - 1)) if k > 1 else 0.0) if flat else (x - mean) / norm
        if 1 / k + rk * lowest >= -16 * eps:
            d = k * (1 / k - mean) ** 2 + (rk - (0.0 if flat else norm)) ** 2 + max(tail, 0.0)
            if d < best_d:
                best, best_d = (k, mean, norm, rk, flat), d
    k, mean, norm, rk, flat = best
    direction = zero.copy()
    for j in range(k):
        if flat:
            direction[order[j]] = ((j == 0) - 1 / k) / math.sqrt((k - 1) / k) if k > 1 else 0.0
        else:
            direction[order[j]] = (zs[j] - mean) / norm
    mask = [float(j in order[:k]) for j in range(kk)]
    p = [max(mask[j] / k + rk * direction[j], 0.0) for j in range(kk)]
    total = sum(p)
    p = [v / total for v in p]
    coef = (1.0 if flat else rk / norm) if rk > 0 else 0.0  # flat: see _sparsestmax_forward
    dz = zero if flat else direction
    dr = [r / rk * d for d in direction] if rk > 0 else zero
    return p, mask, coef, dz, dr


def _scalar_rows(z: Tensor, r: Tensor) -> tuple[list[list[float]], list[float]]:
    """The logits as Python rows and the radius of each row, checked (the scalar path's input)."""
    kk = z.shape[-1]
    try:
        radii = r.expand(z.shape[:-1]).reshape(-1).tolist()
    except RuntimeError as e:
        raise ValueError(
            f"radius of shape {tuple(r.shape)} does not broadcast to the batch shape {tuple(z.shape[:-1])}"
        ) from e
    if any(not v >= 0 for v in radii):  # NaN too: a CPU radius is always checked
        raise ValueError(f"radius must be non-negative, got {r}")
    return z.reshape(-1, kk).tolist(), radii


class _SparsestMaxScalar(torch.autograd.Function):
    """SparsestMax of small CPU inputs (a layer's two rows of three logits) in Python floats.

    NOTE: the batched tensor version costs ~70 tiny ops, whose dispatch is a third of a dense
    layer's fixed cost (a layer's ``ratios()`` forward: 338 us through it, 73 us here); here the
    whole mapping, input checks, shifts and the backward included, is two host reads and one
    tensor per direction. The float64 arithmetic is the batched version's (``_sparsestmax_row``);
    the shifts onto the simplex's hyperplane change neither the argmin nor the gradient (every
    Jacobian has zero row and column sums).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, r: Tensor) -> Tensor:
        rows, radii = _scalar_rows(z, r)
        kk = z.shape[-1]
        rmax = max_radius(kk)
        out: list[list[float]] = []
        saved: list[tuple[list[float], float, list[float], list[float]] | None] = []
        for row, rad in zip(rows, radii, strict=True):
            if not all(math.isfinite(v) for v in row):
                out.append([math.nan] * kk)
                saved.append(None)  # a NaN row: zero gradient
                continue
            top = max(row)
            row = [max(v - top, -_FAR) for v in row]
            shift = (sum(row) - 1) / kk
            p, mask, coef, dz, dr = _sparsestmax_row([v - shift for v in row], min(rad, rmax))
            out.append(p)
            saved.append((mask, coef, dz, dr))
        ctx.saved = saved
        ctx.r_shape = r.shape
        return torch.tensor(out, dtype=z.dtype).reshape(z.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        kk = grad.shape[-1]
        rows = grad.reshape(-1, kk).tolist()
        grad_z, grad_r = [], []
        for g, saved in zip(rows, ctx.saved, strict=True):
            if saved is None:
                grad_z.append([0.0] * kk)
                grad_r.append(0.0)
                continue
            mask, coef, dz, dr = saved
            gm = [a * b for a, b in zip(g, mask, strict=True)]
            centre = sum(gm) / max(sum(mask), 1.0)
            along = sum(a * b for a, b in zip(dz, gm, strict=True))
            grad_z.append([coef * (a - centre - d * along) * s for a, d, s in zip(gm, dz, mask, strict=True)])
            grad_r.append(sum(a * b for a, b in zip(dr, g, strict=True)))
        gz = torch.tensor(grad_z, dtype=grad.dtype).reshape(grad.shape)
        gr = None
        if ctx.needs_input_grad[1]:
            gr = torch.tensor(grad_r, dtype=grad.dtype).reshape(grad.shape[:-1]).sum_to_size(ctx.r_shape)
        return gz, gr


class _SparsestMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, r: Tensor) -> Tensor:
        p, mask, coef, dz, dr = _sparsestmax_forward(z, r)
        ctx.save_for_backward(mask, coef, dz, dr)
        ctx.r_shape = r.shape
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        # On the support S: sparsemax's Jacobian is I - 11^T/|S|; the sphere point's is
        # (r_k/||w||)(I - 11^T/|S| - d d^T) with d the unit direction (symmetric, so J^T = J).
        mask, coef, dz, dr = ctx.saved_tensors
        g = grad * mask
        centred = g - g.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
        grad_z = coef * (centred - dz * (dz * g).sum(-1, keepdim=True)) * mask
        grad_r = None
        if ctx.needs_input_grad[1]:
            grad_r = (dr * grad).sum(-1, keepdim=True).sum_to_size(ctx.r_shape)
        return grad_z, grad_r


def sparsestmax(z: Tensor, radius: float | Tensor, dim: int = -1) -> Tensor:
    """SparsestMax: Euclidean projection onto the simplex with a ball around its centre removed.

    Solves: ``argmin_{p >= 0, sum(p) = 1, ||p - u|| >= radius} ||p - z||^2`` with ``u = 1/K``.

    The minimiser is sparsemax(z) when that lies outside the ball; otherwise it lies on the sphere
    ``||p - u|| = radius`` with a top-k support of ``z``; all k are scored in closed form and the
    feasible point nearest ``z`` is kept, so the result is the exact argmin (the authors' released
    code centres the later stages on the support's centroid, which is not). For
    ``radius >= sqrt((K - 1) / K)`` the result is one-hot at the (first) largest logit. Ties between
    equally near points go to the lowest index, as an infinitesimal decreasing perturbation of
    ``z`` would. Gradients are exact Jacobians everywhere but at such ties, where the argmin has
    none: there (e.g. at the uniform initialisation) the gradient is sparsemax's centring
    projection, finite, so the logits can still learn their way off the tie.

    Args:
        z: logits, any shape with at least 2 categories along ``dim``.
        radius: a float, or a tensor broadcastable to the shape of ``z`` without ``dim``.
        dim: the dimension holding the categories.

    Returns:
        Probabilities of the same shape and dtype as ``z``, differentiable in ``z`` (and in
        ``radius`` when it is a tensor that requires grad). Any finite input is handled; a row
        with a NaN or infinite logit, or a NaN radius, maps to a row of NaN (zero gradient)
        without a host synchronisation. A negative or NaN radius on the CPU raises ValueError.
    """
    if z.dim() == 0 or z.shape[dim] < 2:
        raise ValueError(f"sparsestmax needs at least 2 categories along dim {dim}, got {tuple(z.shape)}")
    zm = z.movedim(dim, -1)
    if _scalar_path(zm, radius):
        r = radius if isinstance(radius, Tensor) else torch.tensor(float(radius), dtype=torch.float64)
        return _SparsestMaxScalar.apply(zm, r).movedim(-1, dim)
    zt, bad = _finite_rows(zm.to(_compute_dtype(z)))
    kk = zt.shape[-1]
    r = _as_radius(radius, zt)
    # NOTE: a NaN radius (a CUDA tensor is not checked, to avoid a sync) gives NaN rows too.
    bad = bad | r.isnan()
    r = r.nan_to_num(0.0).clamp(max=max_radius(kk))
    # NOTE: shift z onto the simplex's hyperplane; the argmin is unchanged (||p - z||^2 differs by
    # a constant for p on the simplex) and the candidates' distances are computed near zero.
    zt = _shift_to_max(zt)
    zt = zt - (zt.sum(-1, keepdim=True) - 1) / kk
    p = _SparsestMax.apply(zt, r)
    return _nan_rows(p, bad).to(z.dtype).movedim(-1, dim)


def _scalar_path(z: Tensor, radius: float | Tensor) -> bool:
    """Whether SparsestMax of ``z`` takes the Python-float path (small CPU inputs, eager)."""
    if z.device.type != "cpu" or z.numel() > SMALL_CPU or _force_batched or torch.compiler.is_compiling():
        return False
    return not isinstance(radius, Tensor) or radius.device.type == "cpu"


def _authors_sparsemax(v: Tensor) -> Tensor:
    """One row of the released code's ``sparsemax``, their operations in their order.

    NOTE: same value as :func:`sparsemax` in exact arithmetic, but not the same rounding: near
    one-hot theirs can give 0.99999994 where ours gives 1, which decides whether their
    SparsestMax latches (see :func:`authors_sparsestmax`), so it is transcribed, not reused.
    """
    v_sorted, _ = torch.sort(v, descending=True)
    cssv = v_sorted.cumsum(0) - 1
    ind = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    cond = v_sorted - cssv / ind > 0
    if not bool(cond.any()):
        # NOTE: their code raises IndexError here: a logit beyond ~1.7e7 in float32, where
        # ``max - 1`` rounds to ``max``. Shifted to its maximum the row has the same sparsemax and
        # ``cond[0]`` holds (``0 - (-1) > 0``).
        return _authors_sparsemax(v - v.detach().max())
    rho = ind.masked_select(cond)[-1]
    tau = cssv.masked_select(cond)[-1] / rho
    return torch.clamp(v - tau, min=0)  # their ``/ z`` with z = 1 changes no bit


def _authors_row(v: Tensor, rad: float, u_in: Tensor | None = None) -> Tensor:
    """One row of the released code's ``sparsestmax`` (``utils/ssn_utils.py`` of
    switchablenorms/Sparse_SwitchNorm), step for step, in ``v``'s dtype, differentiable by autograd.

    NOTE: the sphere is centred on the centroid ``u`` of sparsemax's support, not on the simplex
    centre: with a two-element support the radius is measured from the midpoint of that edge. A
    negative coordinate recurses with the radius reduced by Pythagoras around the new centroid.
    Near one-hot their sparsemax may round to ``1 - 6e-8``; that is not ``== 1``, so the sphere
    step runs with ``u`` at that vertex and returns ``[0, 1 - rad, 0]``, off the simplex: kept.
    """
    w = _authors_sparsemax(v)
    if bool(w.max() - w.min() == 1):
        return w
    ind = (w > 0).to(v.dtype)
    u = ind / ind.sum()
    if u_in is not None:
        # NOTE: the subtraction in v's dtype and the root in double, as theirs (a Python float minus
        # a tensor, then math.sqrt); clamped at 0 where rounding would make theirs raise.
        rad = math.sqrt(max(float(rad**2 - ((u - u_in) ** 2).sum()), 0.0))
    distance = torch.linalg.vector_norm(w - u)
    if bool(distance >= rad):
        return w
    if bool(distance == 0):
        # NOTE: their code divides by zero here (sparsemax at the support's centroid, e.g. the
        # uniform initialisation) and returns NaN; take the exact projection's answer instead.
        return sparsestmax(v, rad) if u_in is None else w
    p = rad * (w - u) / distance + u
    if bool(p.min() < 0):
        return _authors_row(p, rad, u)
    return p.clamp(min=0, max=1)


def authors_sparsestmax(z: Tensor, radius: float | Tensor, dim: int = -1) -> Tensor:
    """The released code's SparsestMax, reproduced for imported checkpoints, rounding included.

    Not the Euclidean projection of :func:`sparsestmax`: it differs when sparsemax(z) has a
    two-element support inside the ball (the radius is measured from that edge's midpoint), and
    near one-hot, where their float32 sparsemax can round a vertex to ``1 - 6e-8`` (0.7-1% of
    float32 logits drawn as ``2 * randn(3)``): then theirs returns ``1 - radius`` at that vertex
    and zeros elsewhere, off the simplex, and their layer does not latch (its test is
    ``max - min >= 1``, which :func:`ssn.update_latches` applies to these layers too). Both are
    reproduced: each row runs their operations in their order and dtype (float32 for float32
    logits, float64 for float64), so the result equals their function's bit for bit on the CPU
    (tested). Their training ran on the GPU, whose reductions (``torch.norm``) may round
    differently in the last bit. Use it to rebuild, exactly, a network the authors' code trained
    and saved before every layer was fixed (``projection="authors"``). Differentiable by autograd
    through the same operations as theirs.

    Where theirs fails, this does not: a row at the support's centroid inside the ball (their
    0/0, NaN) takes :func:`sparsestmax`'s answer; logits beyond ~1.7e7 (their IndexError) are
    shifted to their maximum first; a row with a NaN or infinite logit maps to NaN.

    Args:
        z: logits, any shape with the categories along ``dim``; rows are mapped one at a time.
        radius: a float, or a tensor broadcastable to the shape of ``z`` without ``dim``; rounded
            to ``z``'s compute dtype first, as their float32 ``radius`` buffer holds it.
        dim: the dimension holding the categories.
    """
    if z.dim() == 0 or z.shape[dim] < 2:
        raise ValueError(f"sparsestmax needs at least 2 categories along dim {dim}, got {tuple(z.shape)}")
    zt, bad = _finite_rows(z.movedim(dim, -1).to(_compute_dtype(z)))
    r = _as_radius(radius, zt).expand(zt.shape[:-1] + (1,)).reshape(-1).tolist()
    rows = zt.reshape(-1, zt.shape[-1])
    out = (
        torch.stack([_authors_row(row, rad) for row, rad in zip(rows.unbind(0), r, strict=True)])
        if rows.shape[0]
        else rows
    )
    return _nan_rows(out.reshape(zt.shape), bad).to(z.dtype).movedim(-1, dim)
