"""torch.compile: dense and latched layers trace to one graph (fullgraph=True) in training and
eval, and the compiled layer computes what the eager one does (outputs, gradients, running stats).

The default backend here is ``aot_eager``: it runs dynamo (graph breaks fail with fullgraph) and
AOTAutograd (the traced backward) without inductor's C++ compilation, which takes minutes on a
small CPU. ``SSN_TEST_INDUCTOR=1`` adds the same check through inductor.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo

import ssn

needs_inductor = pytest.mark.skipif(not os.environ.get("SSN_TEST_INDUCTOR"), reason="set SSN_TEST_INDUCTOR=1")


def _layer(kind: str) -> torch.nn.Module:
    if kind == "exported":
        return ssn.LatchedNorm(4, "bn", "in")
    m = ssn.create_norm("sn" if kind == "sn" else "ssn", 4, radius=0.2)
    with torch.no_grad():
        m.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        m.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    if kind == "latched":
        m.latch("bn", "bn")
    elif kind == "mixed":
        m.latch("ln", "in")
    return m


def _compare(kind: str, training: bool, backend: str) -> None:
    torch.manual_seed(0)
    m = _layer(kind).train(training)
    ref = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call reuses the graph (running stats moved in between)
        x = torch.randn(3, 4, 5, 6) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(x1), ref(x2)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
        for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
            if p_ref.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)
        for b, b_ref in zip(m.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref)
        with torch.no_grad():  # eval's no_grad call: the folded path in eager mode
            torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,training",
    [
        ("ssn", True),
        ("ssn", False),
        ("sn", True),
        ("latched", True),
        ("latched", False),
        ("mixed", True),
        ("mixed", False),
        ("exported", True),
    ],
)
def test_fullgraph_compile_matches_eager(kind, training):
    torch._dynamo.reset()
    _compare(kind, training, "aot_eager")


def test_compiled_forward_follows_latches_taken_between_steps():
    """update_latches between steps: the compiled layer recompiles on the latch mirror (a guard on
    Python ints), so it switches to the native kernel, as the eager layer does."""
    torch._dynamo.reset()
    m = _layer("ssn")
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    x = torch.randn(3, 4, 5, 6)
    compiled(x)
    with torch.no_grad():
        m.var_logits.copy_(m.mean_logits)  # BN largest in both
    m.radius.fill_(1.0)
    assert ssn.update_latches(m) == 2 and m.latched == ("bn", "bn")
    m.eval()
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in bn.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), bn(x))


@needs_inductor
@pytest.mark.parametrize("kind", ["ssn", "mixed"])
def test_inductor_matches_eager(kind):
    torch._dynamo.reset()
    _compare(kind, True, "inductor")


def test_task_compile_switch_compiles_the_network_in_place():
    from tasks.classification import ImageClassifier

    plain = ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="ssn")
    task = ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", compile=True)
    task.configure_model()
    plain.configure_model()
    assert task.net._compiled_call_impl is not None and plain.net._compiled_call_impl is None
    assert list(task.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    task.configure_model()  # idempotent (Lightning may call it again)
    assert task.hparams.compile


def test_layers_in_the_same_state_share_one_compiled_graph():
    """The compiled forward is guarded on the latch values, not on which layer or buffer holds
    them: many layers (a ResNet's 53) compile once, within dynamo's recompile limit."""
    torch._dynamo.reset()
    x = torch.randn(2, 4, 3, 3)
    for _ in range(10):  # beyond the default recompile limit of 8
        layer = ssn.create_norm("ssn", 4)
        torch.compile(layer, fullgraph=True, backend="eager")(x)
        layer.to(torch.float64)  # replaced buffers: a new mirror key, the same values
        torch.compile(layer, fullgraph=True, backend="eager")(x.double())
