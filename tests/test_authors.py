"""Import of the authors' checkpoint format, checked against a re-implementation of their layer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ssn.authors import authors_resnet50, load_authors_checkpoint, main


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    zs, _ = z.sort(descending=True)
    k = torch.arange(1, z.numel() + 1, dtype=z.dtype)
    support = (1 + k * zs > zs.cumsum(0)).sum()
    tau = (zs[:support].sum() - 1) / support
    return (z - tau).clamp_min(0)


class TheirSSN2d(nn.Module):
    """Their layer's eval-mode forward as their code writes it (unbiased IN variance, LN from IN
    moments, running BN statistics, ratios from the stored weights). At radius 0 their SparsestMax
    is sparsemax; a fixed ratio's stored weight is the one-hot ratio itself."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, c, 1))
        self.register_buffer("running_var", torch.zeros(1, c, 1))
        self.register_buffer("mean_fixed", torch.LongTensor([0]))
        self.register_buffer("var_fixed", torch.LongTensor([0]))
        self.register_buffer("radius", torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in, var_in = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in**2).mean(1, keepdim=True) - mean_ln**2
        mw = self.mean_weight if self.mean_fixed else _sparsemax(self.mean_weight)
        vw = self.var_weight if self.var_fixed else _sparsemax(self.var_weight)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * self.running_mean
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * self.running_var
        x = (x - mean) / (var + 1e-5).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def _their_model(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=num_classes, norm_layer=TheirSSN2d)
    model.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, TheirSSN2d)):
            c = m.weight.shape[1]
            m.weight.uniform_(0.5, 1.0, generator=g)
            m.bias.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            if i % 3 == 0:  # latched, possibly on different statistics for mean and variance
                m.mean_weight.copy_(torch.eye(3)[i % 2 * 2])
                m.var_weight.copy_(torch.eye(3)[(i // 3) % 3])
                m.mean_fixed.fill_(1), m.var_fixed.fill_(1)
            else:  # dense: sparsemax of the stored logits
                m.mean_weight.copy_(torch.rand(3, generator=g))
                m.var_weight.copy_(torch.rand(3, generator=g))
            assert c == m.running_mean.shape[1]
    return model.eval()


def _their_state_dict(model: nn.Module) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("fc.1.", "fc.")
        parts = k.split(".")
        parts = [p.replace("bn", "sn") if p.startswith("bn") else p for p in parts]
        out["module." + ".".join(parts)] = v
    return {"state_dict": out, "epoch": 100, "arch": "resnet50"}


def test_imported_model_reproduces_their_network(tmp_path):
    theirs = _their_model(num_classes=10)
    ckpt = _their_state_dict(theirs)
    assert (
        "module.sn1.mean_fixed" in ckpt["state_dict"]
        and "module.layer1.0.downsample.1.radius" in ckpt["state_dict"]
    )
    path = tmp_path / "ssn_resnet50.pth"
    torch.save(ckpt, path)
    ours = load_authors_checkpoint(path).eval()
    x = torch.randn(2, 3, 65, 65)  # odd size: the ceil-mode max-pool matters
    with torch.no_grad():  # float32 rounding differs (their E[x^2] - E[x]^2); compare in float64
        want, got = theirs.double()(x.double()), ours.double()(x.double())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert ours.layer1[0].bn1.latched == (None, None) and ours.bn1.latched == ("in", "in")
    # the command writes a state_dict that loads into the same architecture
    main([str(path), str(tmp_path / "ours.pt")])
    again = authors_resnet50(num_classes=10)
    again.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))


def test_refuses_what_does_not_match(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_authors_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_authors_checkpoint(bad)
    import numpy as np

    with_numpy = tmp_path / "np.pth"
    torch.save({"state_dict": {}, "best_prec1": np.float64(77.1)}, with_numpy)
    with pytest.raises(ValueError, match="trusted=True"):
        load_authors_checkpoint(with_numpy)
    with pytest.raises(ValueError, match="authors' layout"):  # trusted: read, then refused by layout
        load_authors_checkpoint(with_numpy, trusted=True)
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(ValueError, match="authors' layout"):
        load_authors_checkpoint(plain)
    theirs = _their_state_dict(_their_model(num_classes=10))
    sd = theirs["state_dict"]
    sd["module.sn1.mean_weight"] = torch.tensor([0.5, 0.5, 0.0])  # fixed but not one-hot
    torch.save(theirs, tmp_path / "f.pth")
    with pytest.raises(ValueError, match="norm sn1 mean: marked fixed but its ratio"):
        load_authors_checkpoint(tmp_path / "f.pth")
    theirs = _their_state_dict(_their_model(num_classes=10))
    del theirs["state_dict"]["module.layer4.2.conv3.weight"]
    torch.save(theirs, tmp_path / "g.pth")
    with pytest.raises(ValueError, match="missing"):
        load_authors_checkpoint(tmp_path / "g.pth")
