"""Backbones: shapes, the registry's errors, and the properties the trainer relies on."""
from __future__ import annotations

import pytest
import torch

from hfsoftmax.models import build_backbone, list_backbones, register_backbone

torch.set_num_threads(1)

ALL = ["convnet-s", "convnet-s-gn", "ir18", "ir34", "ir50", "ir100", "mobilefacenet",
       "resnet18", "resnet34", "resnet50", "resnet101"]
BIG = {"ir100", "resnet101"}


def test_registry_lists_every_backbone():
    assert list_backbones() == sorted(ALL)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n
                                  for n in ALL])
def test_backbone_maps_faces_to_embeddings(name):
    torch.manual_seed(0)
    net = build_backbone(name, embedding_size=64).eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 64)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # The two images give different embeddings (the network is not collapsed).
    assert not torch.allclose(y[0], y[1])


@pytest.mark.parametrize("name", ["convnet-s", "ir18", "mobilefacenet", "resnet50"])
def test_backbone_trains_in_train_mode(name):
    torch.manual_seed(0)
    net = build_backbone(name, embedding_size=32).train()
    y = net(torch.rand(2, 3, 112, 112) * 2 - 1)
    y.pow(2).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_default_embedding_size_is_256():
    with torch.no_grad():
        assert build_backbone("convnet-s").eval()(torch.zeros(1, 3, 112, 112)).shape == (1, 256)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'.*convnet-s.*ir100"):
        build_backbone("resnet9")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256"])
def test_bad_embedding_size_is_rejected(bad):
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone("convnet-s", embedding_size=bad)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        @register_backbone("ir50")
        def another_ir50(embedding_size=256):  # pragma: no cover - never built
            raise AssertionError


def test_groupnorm_convnet_is_batch_independent():
    """convnet-s-gn's output for a sample does not depend on its batch (what the
    distributed-equivalence test needs); convnet-s's BatchNorm in train mode does."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    gn = build_backbone("convnet-s-gn", 16).train()
    torch.testing.assert_close(gn(x)[:2], gn(x[:2]), rtol=1e-5, atol=1e-5)
    bn = build_backbone("convnet-s", 16).train()
    assert not torch.allclose(bn(x)[:2], bn(x[:2]), atol=1e-3)
