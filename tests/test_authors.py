"""Import of the authors' checkpoint format, checked against a re-implementation of their layer."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ssn.authors import authors_resnet50, load_authors_checkpoint, main

from helpers import their_model, their_state_dict


def test_imported_model_reproduces_their_network(tmp_path):
    theirs = their_model(num_classes=10)
    ckpt = their_state_dict(theirs)
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
    theirs = their_state_dict(their_model(num_classes=10))
    sd = theirs["state_dict"]
    sd["module.sn1.mean_weight"] = torch.tensor([0.5, 0.5, 0.0])  # fixed but not one-hot
    torch.save(theirs, tmp_path / "f.pth")
    with pytest.raises(ValueError, match="norm sn1 mean: marked fixed but its ratio"):
        load_authors_checkpoint(tmp_path / "f.pth")
    theirs = their_state_dict(their_model(num_classes=10))
    del theirs["state_dict"]["module.layer4.2.conv3.weight"]
    torch.save(theirs, tmp_path / "g.pth")
    with pytest.raises(ValueError, match="missing"):
        load_authors_checkpoint(tmp_path / "g.pth")
