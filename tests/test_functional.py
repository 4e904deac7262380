"""SparsestMax and sparsemax against independent references (float64 geometry, brute force)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ssn import functional as fn
from ssn.functional import max_radius, sparsemax, sparsestmax


@pytest.fixture(autouse=True, params=["scalar", "batched"])
def float64_and_path(request, monkeypatch):
    """Every test in float64, and through both implementations of the SparsestMax forward:
    the scalar one (small CPU inputs) and the batched tensor one."""
    if request.param == "scalar":
        monkeypatch.setattr(fn, "SMALL_CPU", 10**9)
    else:
        monkeypatch.setattr(fn, "_force_batched", True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- references
def sparsemax_ref(z: torch.Tensor) -> torch.Tensor:
    """Brute force over supports: the projection onto the simplex is the unique candidate
    ``(z - tau)_+`` whose support is exactly where ``z > tau``."""
    k = z.numel()
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            tau = (z[idx].sum() - 1) / size
            p = (z - tau).clamp_min(0)
            if torch.all((z[idx] - tau) > 0) and torch.all(
                torch.tensor([z[j] <= tau + 1e-12 for j in range(k) if j not in support])
            ):
                return p
    raise AssertionError("no support found")


def _project_segment(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = b - a
    t = ((z - a) @ d / (d @ d)).clamp(0, 1)
    return a + t * d


def sparsestmax_k3_ref(z: torch.Tensor, r: float) -> torch.Tensor:
    """Exact solver for K = 3 by enumerating every candidate the geometry allows.

    The feasible set is the triangle minus an open disc around its centroid u. The nearest point
    to z is one of: sparsemax(z) (if feasible), the radial projection of z onto the circle, the
    circle's intersections with the triangle's edges, the projections of z onto the edges, and the
    vertices. The feasible candidate nearest z wins.
    """
    z = z - (z.sum() - 1) / 3  # onto the plane of the simplex
    u = torch.full((3,), 1 / 3)
    verts = torch.eye(3)
    cands = [sparsemax_ref(z)]
    w = z - u
    if w.norm() > 1e-12:
        cands.append(u + r * w / w.norm())
    else:  # z = u: every point of the circle is equally near; take those towards the vertices
        cands.extend(u + r * (v - u) / (v - u).norm() for v in torch.eye(3))
    for i, j in itertools.combinations(range(3), 2):
        a, b = verts[i], verts[j]
        cands.append(_project_segment(z, a, b))
        # points a + t (b - a) with ||a + t (b - a) - u|| = r
        d, e = b - a, a - u
        qa, qb, qc = d @ d, 2 * (d @ e), e @ e - r * r
        disc = qb * qb - 4 * qa * qc
        if disc >= 0:
            for sgn in (-1, 1):
                t = (-qb + sgn * math.sqrt(disc)) / (2 * qa)
                if -1e-12 <= t <= 1 + 1e-12:
                    cands.append(a + min(max(t, 0.0), 1.0) * d)
    cands.extend(verts)
    best, best_d = None, math.inf
    for p in cands:
        feasible = bool((p >= -1e-12).all()) and abs(float(p.sum()) - 1) < 1e-9
        feasible &= float((p - u).norm()) >= r - 1e-9
        dist = float(((p - z) ** 2).sum())
        if feasible and dist < best_d - 1e-13:
            best, best_d = p, dist
    assert best is not None
    return best


# ----------------------------------------------------------------------------- sparsemax
def test_sparsemax_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for k in range(2, 7):
        for _ in range(40):
            z = torch.randn(k, generator=g) * 2
            torch.testing.assert_close(sparsemax(z), sparsemax_ref(z))


def test_sparsemax_batched_any_dim():
    z = torch.randn(4, 5, 6)
    p = sparsemax(z, dim=1)
    ref = torch.stack([torch.stack([sparsemax_ref(z[i, :, j]) for j in range(6)], -1) for i in range(4)])
    torch.testing.assert_close(p, ref)


def test_sparsemax_gradcheck():
    z = torch.randn(5, 4, requires_grad=True)
    assert torch.autograd.gradcheck(sparsemax, (z,))


# --------------------------------------------------------------------------- sparsestmax
@pytest.mark.parametrize("seed", range(4))
def test_sparsestmax_k3_matches_exact_solver(seed):
    g = torch.Generator().manual_seed(seed)
    rmax = max_radius(3)
    for _ in range(150):
        z = torch.randn(3, generator=g) * float(torch.rand(1, generator=g)) * 3
        r = float(torch.rand(1, generator=g)) * rmax
        ref = sparsestmax_k3_ref(z, r)
        p = sparsestmax(z, r)
        # compare objective values (ties may pick different points) and then the points
        d_ours = float(((p - (z - (z.sum() - 1) / 3)) ** 2).sum())
        d_ref = float(((ref - (z - (z.sum() - 1) / 3)) ** 2).sum())
        assert d_ours == pytest.approx(d_ref, abs=1e-10), (z, r, p, ref)
        torch.testing.assert_close(p, ref, atol=1e-7, rtol=0)


def test_sparsestmax_k3_edge_cases_against_exact_solver():
    cases = [
        (torch.tensor([0.0, 0.0, 0.0]), 0.3),  # uniform: tie-break to index 0
        (torch.tensor([1.0, 1.0, 0.0]), 0.5),  # tie on the top-2 face
        (torch.tensor([0.2, 0.1, 0.0]), 0.1),
        (torch.tensor([5.0, -5.0, 0.0]), 0.2),  # sparsemax already one-hot
        (torch.tensor([0.1, 0.3, 0.2]), max_radius(3) - 1e-9),
    ]
    for z, r in cases:
        ref = sparsestmax_k3_ref(z, r)
        p = sparsestmax(z, r)
        zz = z - (z.sum() - 1) / 3
        assert float(((p - zz) ** 2).sum()) == pytest.approx(float(((ref - zz) ** 2).sum()), abs=1e-10)


def test_sparsestmax_beats_dense_sampling_k4_k5():
    """No feasible point of a dense random sample is nearer to z than our answer."""
    g = torch.Generator().manual_seed(1)
    for k in (4, 5):
        pts = torch.distributions.Dirichlet(torch.full((k,), 0.4)).sample((60000,))
        faces = torch.eye(k)  # vertices are feasible for every r <= rmax
        pts = torch.cat([pts, faces])
        for _ in range(30):
            z = torch.randn(k, generator=g) * 2
            r = float(torch.rand(1, generator=g)) * max_radius(k)
            p = sparsestmax(z, r)
            feasible = pts[(pts - 1 / k).norm(dim=-1) >= r]
            best = ((feasible - z) ** 2).sum(-1).min()
            assert float(((p - z) ** 2).sum()) <= float(best) + 1e-9


@pytest.mark.parametrize("k", range(2, 7))
def test_sparsestmax_invariants(k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(200, k, generator=g) * 2
    rmax = max_radius(k)
    for r in (0.0, 0.3 * rmax, 0.7 * rmax, 0.99 * rmax):
        p = sparsestmax(z, r)
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(200))
        assert ((p - 1 / k).norm(dim=-1) >= r - 1e-9).all()
    torch.testing.assert_close(sparsestmax(z, 0.0), torch.stack([sparsemax_ref(row) for row in z]))
    for r in (rmax, rmax + 0.5):
        p = sparsestmax(z, r)
        assert torch.equal(p, torch.nn.functional.one_hot(z.argmax(-1), k).to(p.dtype))


def test_sparsestmax_float32_exact_simplex_and_one_hot():
    z = torch.randn(1000, 3, dtype=torch.float32) * 3
    for r in (0.2, 0.5, 0.8):
        p = sparsestmax(z, r)
        assert p.dtype == torch.float32
        assert (p >= 0).all()
        assert (p.sum(-1) - 1).abs().max() < 1e-6
    p = sparsestmax(z, max_radius(3))
    assert torch.equal(p.max(-1).values, torch.ones(1000, dtype=torch.float32))


def test_sparsestmax_tensor_radius_broadcast_and_dim():
    z = torch.randn(4, 3, 5)
    r = torch.tensor([0.0, 0.2, 0.5, 0.8]).view(4, 1)
    p = sparsestmax(z, r, dim=1)
    for i in range(4):
        for j in range(5):
            torch.testing.assert_close(p[i, :, j], sparsestmax(z[i, :, j], float(r[i, 0])))
    with pytest.raises(ValueError, match="broadcast"):
        sparsestmax(z, torch.zeros(3), dim=1)
    with pytest.raises(ValueError, match="non-negative"):
        sparsestmax(z, -0.1)
    with pytest.raises(ValueError, match="2 categories"):
        sparsestmax(torch.zeros(4, 1), 0.1)


def test_sparsestmax_gradcheck_in_every_regime():
    g = torch.Generator().manual_seed(3)
    for k in (2, 3, 4, 6):
        z = torch.randn(16, k, generator=g)
        for r in (0.0, 0.25 * max_radius(k), 0.6 * max_radius(k)):
            zz = z.clone().requires_grad_()
            assert torch.autograd.gradcheck(lambda t, r=r: sparsestmax(t, r), (zz,), atol=1e-6)
    # gradient through a tensor radius
    z = torch.randn(32, 3, generator=g)
    rad = torch.full((32,), 0.4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, rr: sparsestmax(t, rr), (z.requires_grad_(), rad))


def test_sparsestmax_gradient_finite_at_uniform_and_ties():
    for z0 in ([0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.3, 0.3, 0.3]):
        for dtype in (torch.float32, torch.float64):
            z = torch.tensor(z0, dtype=dtype, requires_grad=True)
            for r in (0.0, 0.1, 0.5, max_radius(3)):
                p = sparsestmax(z, r)
                assert torch.isfinite(p).all()
                torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=dtype))
                (p * torch.arange(3, dtype=dtype)).sum().backward()
                assert torch.isfinite(z.grad).all()
                z.grad = None


def test_sparsestmax_half_input():
    z = torch.randn(10, 3).half()
    p = sparsestmax(z, 0.5)
    assert p.dtype == torch.float16 and torch.isfinite(p).all()


def test_tie_gradient_is_sparsemax_centring_so_training_can_leave_a_tie():
    for r in (0.1, 0.3, 0.4):  # below sqrt(1/6) the whole simplex is the only face reaching the sphere
        z = torch.zeros(3, requires_grad=True)  # the layers' initialisation
        g = torch.tensor([1.0, 0.0, -2.0])
        sparsestmax(z, r).backward(g)
        torch.testing.assert_close(z.grad, g - g.mean())


# ----------------------------------------------------------------------------- extreme inputs
EXTREME = [
    [1e8, 0, 0],
    [-1e8, 0, 0],
    [1e8, 1e8, 0],
    [1e8, 1e8 + 8, 0],
    [1e30, -1e30, 0],
    [3e38, -3e38, 1],
    [3e38, 3e38, -3e38],
    [0.1, 0, -1e6],
    [5e7, 5e7 + 4, 5e7 + 8, 5e7],
    [1e-30, 0, 2e-30],
]


def _objective(p: torch.Tensor, z: torch.Tensor) -> float:
    """``||p - z||^2`` up to a constant, shift-invariant so huge logits stay exact in float64."""
    p, z = p.double(), z.double()
    return float((p * p).sum() - 2 * (p * (z - z.max())).sum())


@pytest.mark.parametrize("z", EXTREME)
def test_any_finite_float32_input_is_projected_as_in_float64(z):
    zt = torch.tensor(z, dtype=torch.float32)
    kk = zt.numel()
    torch.testing.assert_close(sparsemax(zt).double(), sparsemax(zt.double()), atol=1e-6, rtol=0)
    torch.testing.assert_close(sparsemax(zt.double()), sparsemax_ref(zt.double() - zt.double().max()))
    for r in (0.0, 0.3, 0.6, 0.81, 1.0):
        p, ref = sparsestmax(zt, r), sparsestmax(zt.double(), r)
        assert p.dtype == torch.float32 and bool((p >= 0).all())
        assert abs(float(p.double().sum()) - 1) < 1e-6
        assert float((p.double() - 1 / kk).norm()) >= min(r, max_radius(kk)) - 1e-6
        # ties (logits equal in float64's view) have several argmins: compare the objective
        assert _objective(p, zt) <= _objective(ref, zt) + 1e-5


def test_non_finite_logits_give_nan_rows_and_a_nan_radius_is_refused():
    z = torch.tensor(
        [[float("nan"), 0.0, 0.0], [0.5, 0.2, 0.1], [float("inf"), 0.0, 0.0]], requires_grad=True
    )
    for f in (sparsemax, lambda t: sparsestmax(t, 0.3)):
        p = f(z)
        assert p[0].isnan().all() and p[2].isnan().all() and torch.isfinite(p[1]).all()
        (grad,) = torch.autograd.grad(p[1].sum() + p[0].nan_to_num().sum(), z)
        assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="non-negative"):
        sparsestmax(z.detach()[1:2], torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        sparsestmax(z.detach()[1:2], float("nan"))
