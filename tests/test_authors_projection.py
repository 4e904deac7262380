"""The authors' SparsestMax as an explicit option, against their code copied verbatim.

Reference: ``utils/ssn_utils.py`` of switchablenorms/Sparse_SwitchNorm (the released code), below
as they wrote it (only ``torch.tensor(w > 0)`` spelled ``(w > 0)``, the same value). Their function
is per 1-D vector, differentiable by autograd.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import ssn
from ssn.authors import authors_resnet50, load_authors_checkpoint, main, unfixed_layers
from ssn.functional import authors_sparsestmax, sparsestmax


def their_sparsemax(v, z=1):
    v_sorted, _ = torch.sort(v, dim=0, descending=True)
    cssv = torch.cumsum(v_sorted, dim=0) - z
    ind = torch.arange(1, 1 + len(v)).to(v)
    cond = v_sorted - cssv / ind > 0
    rho = ind.masked_select(cond)[-1]
    tau = cssv.masked_select(cond)[-1] / rho
    w = torch.clamp(v - tau, min=0)
    return w / z


def their_sparsestmax(v, rad_in=0, u_in=None):
    w = their_sparsemax(v)
    if max(w) - min(w) == 1:
        return w
    ind = (w > 0).to(v)
    u = ind / torch.sum(ind)
    if u_in is None:
        rad = rad_in
    else:
        rad = math.sqrt(rad_in**2 - torch.sum((u - u_in) ** 2))
    distance = torch.norm(w - u)
    if distance >= rad:
        return w
    p = rad * (w - u) / distance + u
    if min(p) < 0:
        return their_sparsestmax(p, rad, u)
    return p.clamp_(min=0, max=1)


def _cases(n: int = 400) -> list[tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        z = torch.randn(3, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 2)
        r = float(torch.rand(1, generator=g)) * 1.0
        out.append((z, r))
    return out


def test_reproduces_their_outputs_and_gradients():
    checked = differs = 0
    for z, r in _cases():
        want = their_sparsestmax(z, r)
        if not torch.isfinite(want).all():
            continue
        zz = z.clone().requires_grad_()
        got = authors_sparsestmax(zz, r)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"z={z.tolist()} r={r}")
        zt = z.clone().requires_grad_()
        their = their_sparsestmax(zt, r)
        g = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
        if their.requires_grad:
            (gz,) = torch.autograd.grad((their * g).sum(), zt, allow_unused=True)
            (gg,) = torch.autograd.grad((got * g).sum(), zz, allow_unused=True)
            if gz is not None:
                torch.testing.assert_close(gg, gz, atol=1e-6, rtol=0)
        checked += 1
        differs += bool((sparsestmax(z, r) - want).abs().max() > 1e-6)
    # the option matters: in a good share of cases their result is not the exact projection
    assert checked > 300 and differs > 20, (checked, differs)


def test_two_element_support_measures_the_radius_from_the_edge_midpoint():
    # sparsemax(z) = (0.55, 0.45, 0): two non-zeros, at distance ~0.42 from the simplex centre.
    z = torch.tensor([0.55, 0.45, 0.0], dtype=torch.float64)
    r = 0.3
    exact, theirs = sparsestmax(z, r), authors_sparsestmax(z, r)
    torch.testing.assert_close(theirs, their_sparsestmax(z, r))
    centre = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert (exact - their_sparsemax(z)).abs().max() < 1e-12  # outside the ball: sparsemax is the argmin
    assert (theirs - centre).norm() > r  # theirs moved away from the edge midpoint instead
    assert (theirs - exact).abs().max() > 0.05


def test_layer_option_batched_and_validated():
    z = torch.randn(5, 3, dtype=torch.float64)
    p = authors_sparsestmax(z, torch.full((5,), 0.4, dtype=torch.float64))
    for i in range(5):
        torch.testing.assert_close(p[i], their_sparsestmax(z[i], 0.4))
    layer = ssn.create_norm("ssn", 4, projection="authors", radius=0.4)
    with torch.no_grad():
        layer.mean_logits.copy_(torch.tensor([0.55, 0.45, 0.0]))
    torch.testing.assert_close(
        layer.ratios()[0].double(),
        their_sparsestmax(layer.mean_logits.detach().double(), 0.4),
        atol=1e-6,
        rtol=0,
    )
    converted = ssn.convert_norm(torch.nn.Sequential(layer), "ssn")
    assert converted[0].projection == "authors"
    with pytest.raises(ValueError, match="projection must be one of"):
        ssn.create_norm("ssn", 4, projection="approx")


def _their_mid_training_file(tmp_path) -> tuple[str, torch.nn.Module]:
    """A checkpoint in their layout saved at radius 0.35 with three layers not fixed yet, and its network."""
    model = authors_resnet50(num_classes=10)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, ssn.SparseSwitchNorm2d)):
            m.radius.fill_(0.35)
            if i < 3:  # three layers still learning their ratios
                m.mean_logits.copy_(torch.randn(3, generator=g))
                m.var_logits.copy_(torch.tensor([0.55, 0.45, 0.0]))
            else:
                m.latch("bn", "bn")
                m.mean_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
                m.var_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
    # write it in their layout
    theirs = {}
    for k, v in model.state_dict().items():
        k2 = k.replace(".bn", ".sn").replace("bn1.", "sn1.") if ".bn" in k or k.startswith("bn1.") else k
        mod, leaf = k2.rsplit(".", 1)
        names = {"mean_logits": "mean_weight", "var_logits": "var_weight"}
        if leaf in ("mean_latch", "var_latch"):
            theirs[f"{mod}.{leaf.split('_')[0]}_fixed"] = torch.tensor([int(v >= 0)])
        elif leaf == "num_batches_tracked":
            continue
        elif leaf == "radius":
            theirs[f"{mod}.radius"] = v.reshape(1)
        else:
            theirs[f"{mod}.{names.get(leaf, leaf)}"] = v
    path = tmp_path / "mid.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in theirs.items()}}, path)
    return str(path), model


def test_loader_names_unfixed_layers_and_reproduces_them_with_their_projection(tmp_path, caplog):
    path, model = _their_mid_training_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ssn.authors"):
        ours = load_authors_checkpoint(path)
    assert "3 SSN layers are not fixed" in caplog.text and "projection='authors'" in caplog.text
    assert [n for n, _, _ in unfixed_layers(ours)] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    rebuilt = load_authors_checkpoint(path, projection="authors")
    for (_, a), (_, b) in zip(ssn.switch_norms(rebuilt), ssn.switch_norms(model), strict=True):
        for ra, la in zip(a.ratios(), (b.mean_logits, b.var_logits), strict=True):
            want = their_sparsestmax(la.detach().double(), 0.35) if None in b.latched else None
            if want is not None:
                torch.testing.assert_close(ra.double(), want, atol=1e-6, rtol=0)
    # the exact projection gives different ratios on the two-element-support variance
    assert (ours.layer1[0].bn1.ratios()[1] - rebuilt.layer1[0].bn1.ratios()[1]).abs().max() > 0.05


# ----------------------------------------------------------------- float32 rounding near one-hot
def _their_fixed(ratio: torch.Tensor) -> bool:
    """Their layer's latch test on a ratio (``max(w) - min(w) >= 1`` in its forward)."""
    return bool(max(ratio) - min(ratio) >= 1)


def _near_one_hot_sweep(n: int = 2500) -> list[torch.Tensor]:
    """Random float32 logits; at this scale about 1% have a sparsemax vertex their code rounds below 1."""
    g = torch.Generator().manual_seed(5)
    return list((torch.randn(n, 3, generator=g) * 2).unbind(0))


ISSUE_Z = [-2.122936964035034, -0.34824520349502563, -1.6806867122650146]  # issue 18, item 4


def test_float32_rounding_near_one_hot_is_theirs():
    z = torch.tensor(ISSUE_Z)
    assert their_sparsemax(z)[1] == 1 - 2**-24  # their sparsemax rounds the vertex below 1 ...
    assert their_sparsestmax(z, 0.5).tolist() == [0.0, 0.5, 0.0]  # ... so the sphere step leaves the simplex
    assert torch.equal(authors_sparsestmax(z, 0.5), their_sparsestmax(z, 0.5))
    below = above = 0
    for i, z in enumerate(_near_one_hot_sweep()):
        w = their_sparsemax(z)
        below += bool(w.max() < 1) and int((w > 0).sum()) == 1
        above += bool(w.max() > 1)
        for r in (0.0, 1e-8, 0.5, 0.8):
            r = float(torch.tensor(r))  # their radius is a float32 buffer, read with .item()
            want = their_sparsestmax(z, r)
            got = authors_sparsestmax(z, r)
            assert torch.equal(got, want), f"z={z.tolist()} r={r}: {got.tolist()} vs theirs {want.tolist()}"
            if i % 25 == 0:  # gradients through the same operations as theirs
                zz, zt = z.clone().requires_grad_(), z.clone().requires_grad_()
                g = torch.tensor([0.3, -1.0, 0.7])
                mine, their = authors_sparsestmax(zz, r), their_sparsestmax(zt, r)
                if their.requires_grad:
                    (gz,) = torch.autograd.grad((their * g).sum(), zt, allow_unused=True)
                    (gg,) = torch.autograd.grad((mine * g).sum(), zz, allow_unused=True)
                    if gz is not None:
                        torch.testing.assert_close(gg, gz, atol=1e-6, rtol=0)
    # the sweep holds both roundings: below 1 (off the simplex at r > 0), above 1 (fixed at r = 0)
    assert below >= 8 and above >= 2, (below, above)


def test_authors_layers_latch_exactly_where_their_layers_fix_the_ratio():
    zs = _near_one_hot_sweep()
    near = [z for z in zs if their_sparsemax(z).max() != 1 and int((their_sparsemax(z) > 0).sum()) == 1]
    cases = [torch.tensor(ISSUE_Z)] + near + zs[:150]
    for r in (0.0, 0.5):
        layers = torch.nn.ModuleList(ssn.create_norm("ssn", 1, projection="authors", radius=r) for _ in cases)
        with torch.no_grad():
            for m, z in zip(layers, cases, strict=True):
                m.mean_logits.copy_(z)
                m.var_logits.copy_(torch.tensor([0.3, 0.2, 0.1]))  # dense at these radii
        ssn.update_latches(layers)
        wants = [their_sparsestmax(z, r) for z in cases]
        fixed = [_their_fixed(w) for w in wants]
        assert any(fixed) and not all(fixed)
        assert sum(fixed[1 : 1 + len(near)]) not in (0, len(near))  # the rounding decides both ways
        for m, z, want, fix in zip(layers, cases, wants, fixed, strict=True):
            assert (m.latched[0] is not None) == fix, f"z={z.tolist()} r={r}: theirs {fix}, ours {m.latched}"
            assert m.latched[1] is None
            if fix:
                assert m.latched[0] == ssn.STATS[int(want.argmax())]
            else:  # not latched: the layer mixes with their ratio, off the simplex included
                assert torch.equal(m.ratios()[0], want), f"z={z.tolist()} r={r}"


# ----------------------------------------------------------------- the converter records the projection
def test_converted_file_loads_back_with_the_projection_it_was_written_with(tmp_path, capsys):
    path, _ = _their_mid_training_file(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs, loaded = {}, {}
    for projection, flag in (("exact", []), ("authors", ["--projection", "authors"])):
        dst = str(tmp_path / f"{projection}.pt")
        main([path, dst, *flag])
        assert f"projection={projection!r}" in capsys.readouterr().out
        want = load_authors_checkpoint(path, projection=projection).eval()
        got = authors_resnet50(num_classes=10)  # the documented loading: built with the default projection
        got.load_state_dict(torch.load(dst, weights_only=True))
        got.eval()
        assert {m.projection for _, m in ssn.switch_norms(got)} == {projection}
        for (name, a), (_, b) in zip(ssn.switch_norms(got), ssn.switch_norms(want), strict=True):
            for ra, rb in zip(a.ratios(), b.ratios(), strict=True):
                assert torch.equal(ra, rb), name
        with torch.no_grad():
            outputs[projection] = got(x)
            torch.testing.assert_close(outputs[projection], want(x), rtol=0, atol=0)
        loaded[projection] = got
    # the flag changes the network the file rebuilds (their ratios on the three unfixed layers)
    assert (outputs["exact"] - outputs["authors"]).abs().max() > 1e-3
    # a plain dict (its metadata dropped) keeps the projection the network has
    model = loaded["exact"]
    model.load_state_dict(dict(torch.load(tmp_path / "authors.pt", weights_only=True)))
    assert {m.projection for _, m in ssn.switch_norms(model)} == {"exact"}
    bad = torch.load(tmp_path / "authors.pt", weights_only=True)
    bad._metadata[""]["ssn_projection"] = "approx"
    with pytest.raises(RuntimeError, match="records projection 'approx'"):
        model.load_state_dict(bad)
