"""python -m hfsoftmax.export: backbone-only weights, TorchScript and ONNX, with onnxruntime's
outputs compared to torch's (fp32, within 1e-4) for ir18 and mobilefacenet at batch 1 and 7."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hfsoftmax.export import main
from hfsoftmax.models import build_backbone

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def trained_like(arch, dim, seed=0):
    """A backbone whose BatchNorm statistics, affine terms and PReLU slopes are not the
    initial ones, so that every layer shapes the output and the outputs are O(1)."""
    torch.manual_seed(seed)
    net = build_backbone(arch, dim).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight.requires_grad:
                m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            assert m.running_mean.shape == (n,)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):  # unit gain, no blow-up
            fan_in = m.weight[0].numel()
            m.weight.data.normal_(0.0, fan_in ** -0.5)
    return net


@pytest.mark.parametrize("arch,dim", [("ir18", 64), ("mobilefacenet", 128)])
def test_onnx_torchscript_and_weights_match_torch(arch, dim, tmp_path):
    net = trained_like(arch, dim)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": net.state_dict(), "args": {"arch": arch, "embedding_size": dim},
                "step": 5}, ckpt)
    out = tmp_path / "export"
    assert main(["--load-path", str(ckpt), "--out-dir", str(out), "--check-count", "7"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["ok"] is True and manifest["opset"] == 17
    assert manifest["arch"] == arch and manifest["embedding_size"] == dim
    assert set(manifest["checks"]) == {"pt", "torchscript", "onnx"}
    assert all(d <= 1e-4 for per in manifest["checks"].values() for d in per.values())
    assert manifest["checks"]["pt"] == {"1": 0.0, "7": 0.0}

    model = onnx.load(str(out / "backbone.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # our own comparison, on images the tool's check did not use
    sess = ort.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
    ts = torch.jit.load(str(out / "backbone.torchscript.pt"))
    g = torch.Generator().manual_seed(123)
    for batch in (1, 7):
        x = torch.rand((batch, 3, 112, 112), generator=g) * 2 - 1
        with torch.no_grad():
            ref = net(x).numpy()
            got_ts = ts(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape == (batch, dim)
        assert np.abs(ref).mean() > 0.05  # the comparison is not between near-zero outputs
        assert np.abs(got - ref).max() <= 1e-4
        assert np.abs(got_ts - ref).max() <= 1e-4
    twin = build_backbone(arch, dim)
    twin.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))  # strict


def test_arcface_file_exports_with_arch_and_a_failed_check_exits_1(tmp_path):
    from tests.test_init_weights import arcface_iresnet_keys

    net = trained_like("ir18", 32, seed=1)
    theirs = dict(zip(arcface_iresnet_keys([2, 2, 2, 2]), net.state_dict().values()))
    path = tmp_path / "backbone.pth"
    torch.save(theirs, path)
    base = ["--load-path", str(path), "--out-dir", str(tmp_path / "e"), "--formats", "onnx"]
    assert main(base) == 2  # a bare state_dict needs --arch and --embedding-size
    base += ["--arch", "ir18", "--embedding-size", "32"]
    assert main(base) == 0
    manifest = json.loads((tmp_path / "e" / "export.json").read_text())
    assert manifest["files"] == {"onnx": "backbone.onnx"} and manifest["ok"]
    diff = max(manifest["checks"]["onnx"].values())
    assert 0 < diff <= 1e-4
    assert main([*base, "--atol", f"{diff / 10:g}"]) == 1
    assert json.loads((tmp_path / "e" / "export.json").read_text())["ok"] is False


def test_check_images_from_an_image_list(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png 0\n" for i in range(3)))
    net = trained_like("mobilefacenet", 16)
    torch.save({"model": net.state_dict(), "args": {"arch": "mobilefacenet",
                                                    "embedding_size": 16}}, tmp_path / "c.pth")
    assert main(["--load-path", str(tmp_path / "c.pth"), "--out-dir", str(tmp_path / "o"),
                 "--formats", "torchscript", "--check-images", str(tmp_path / "list.txt")]) == 0
    assert main(["--load-path", str(tmp_path / "c.pth"), "--out-dir", str(tmp_path / "o"),
                 "--check-images", str(tmp_path / "missing.txt")]) == 2
