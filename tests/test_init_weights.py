"""--init-from: backbone weights from our checkpoints, plain state_dicts and arcface_torch's
key layout (built here from its documented key list, no download); the report of what does
not fit; --freeze-backbone-steps; and --init-from followed by --resume."""
from __future__ import annotations

import os

import pytest
import torch

from hfsoftmax.engine.config import parse_args
from hfsoftmax.engine.init_weights import load_backbone_weights
from hfsoftmax.models import build_backbone
from hfsoftmax.models.keymap import detect_layout, mobilefacenet_scale
from hfsoftmax.train import main, run
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def arcface_iresnet_keys(layers):
    """arcface_torch's IResNet state_dict keys, in its module order (from its public
    iresnet.py: conv1, bn1, prelu, layer1..4 of IBasicBlock(bn1, conv1, bn2, prelu, conv2,
    bn3, downsample.0/1 on a stage's first block), bn2, dropout, fc, features)."""
    keys = ["conv1.weight", *(f"bn1.{b}" for b in BN), "prelu.weight"]
    for s, n in enumerate(layers, 1):
        for i in range(n):
            p = f"layer{s}.{i}"
            keys += [*(f"{p}.bn1.{b}" for b in BN), f"{p}.conv1.weight",
                     *(f"{p}.bn2.{b}" for b in BN), f"{p}.prelu.weight", f"{p}.conv2.weight",
                     *(f"{p}.bn3.{b}" for b in BN)]
            if i == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in BN)]
    return keys + [*(f"bn2.{b}" for b in BN), "fc.weight", "fc.bias",
                   *(f"features.{b}" for b in BN)]


def arcface_mbf_keys(blocks=(1, 4, 6, 2)):
    """arcface_torch's MobileFaceNet keys (public mobilefacenet.py): ConvBlock = layers.{0
    conv, 1 BN, 2 PReLU}, LinearBlock = layers.{0 conv, 1 BN}, DepthWise = layers.{0
    ConvBlock, 1 ConvBlock, 2 LinearBlock}, Residual = layers.{r} DepthWise, GDC."""
    conv = lambda p: [f"{p}.layers.0.weight", *(f"{p}.layers.1.{b}" for b in BN),  # noqa
                      f"{p}.layers.2.weight"]
    lin = lambda p: [f"{p}.layers.0.weight", *(f"{p}.layers.1.{b}" for b in BN)]  # noqa
    dw = lambda p: conv(f"{p}.layers.0") + conv(f"{p}.layers.1") + lin(f"{p}.layers.2")  # noqa
    keys = conv("layers.0") + conv("layers.1")
    for stage, n in zip((2, 3, 4, 5, 6, 7), (None, blocks[1], None, blocks[2], None,
                                             blocks[3])):
        keys += dw(f"layers.{stage}") if n is None else \
            [k for r in range(n) for k in dw(f"layers.{stage}.layers.{r}")]
    return keys + conv("conv_sep") + lin("features.layers.0") + [
        "features.layers.2.weight", *(f"features.layers.3.{b}" for b in BN)]


def random_like(state, seed):
    """Random values of the shapes of ``state`` (positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.dtype == torch.long:
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith(
                "features.weight") or k.endswith("embedding.3.weight") else 0.0)
    return out


def theirs_and_ours(model, their_keys, seed=0):
    """The same random tensors under arcface_torch's names and under ours, paired by module
    order (both networks register their modules in the same order)."""
    ours = list(model.state_dict().items())
    assert len(ours) == len(their_keys), (len(ours), len(their_keys))
    values = random_like(dict(ours), seed)
    return ({t: values[k] for t, (k, _) in zip(their_keys, ours)}, values)


def test_arcface_iresnet_file_loads_into_ir50_like_our_own_keys(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("ir50", 512).eval()
    theirs, ours = theirs_and_ours(net, arcface_iresnet_keys([3, 4, 14, 3]))
    assert detect_layout(theirs) == "arcface-iresnet"
    # as arcface_torch saves it through DataParallel
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in theirs.items()}, path)
    report = load_backbone_weights(net, path)
    assert report.ok and report.layout == "arcface-iresnet"
    assert report.missing == [] and report.loaded == len(ours)
    twin = build_backbone("ir50", 512).eval()
    twin.load_state_dict(ours)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))
    for k, v in twin.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


def test_a_shape_mismatch_is_reported_by_name_and_strict_false_loads_the_rest():
    net = build_backbone("ir18", 256)
    theirs, _ = theirs_and_ours(build_backbone("ir18", 512), arcface_iresnet_keys([2] * 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_backbone_weights(net, theirs)
    msg = str(e.value)
    assert "embedding.2.weight (file fc.weight: (512, 25088) vs model (256, 25088))" in msg
    assert "features.running_mean" in msg and "--embedding-size 512" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    report = load_backbone_weights(net, theirs, strict=False)
    assert {m[1] for m in report.mismatched} >= {"fc.weight", "fc.bias", "features.weight"}
    assert torch.equal(net.state_dict()["stem.0.weight"], theirs["conv1.weight"])
    assert torch.equal(net.state_dict()["layer3.1.conv2.weight"],
                       theirs["layer3.1.conv2.weight"])


def test_missing_unexpected_and_nonfinite_keys_are_named():
    net = build_backbone("convnet-s", 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    state["fc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError) as e:
        load_backbone_weights(net, state)
    msg = str(e.value)
    assert "1 missing (in the model, not in the file): fc.bias" in msg
    assert "1 unexpected (in the file, not in the model): head.weight" in msg
    assert "NaN or inf: fc.weight" in msg


def test_arcface_mobilefacenet_scale_1_loads_and_scale_2_is_explained():
    net = build_backbone("mobilefacenet", 128).eval()
    theirs, ours = theirs_and_ours(net, arcface_mbf_keys())
    assert detect_layout(theirs) == "arcface-mbf" and mobilefacenet_scale(theirs) == 1
    assert load_backbone_weights(net, theirs).ok
    twin = build_backbone("mobilefacenet", 128).eval()
    twin.load_state_dict(ours)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))
    # arcface_torch's default mbf (scale=2): no renaming can fit it; say why
    wide = dict(theirs)
    wide["layers.0.layers.0.weight"] = torch.zeros(128, 3, 3, 3)
    wide["layers.1.layers.0.weight"] = torch.zeros(128, 2, 3, 3)
    with pytest.raises(ValueError, match=r"(?s)stem\.1\.0\.weight \(file layers\.1\.layers\.0"
                                         r"\.weight: \(128, 2, 3, 3\).*scale=2"):
        load_backbone_weights(build_backbone("mobilefacenet", 128), wide)


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="x.pth: not readable"):
        load_backbone_weights(build_backbone("convnet-s", 16), bad)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "y.pth")
    with pytest.raises(ValueError, match="neither a state_dict nor a checkpoint"):
        load_backbone_weights(build_backbone("convnet-s", 16), tmp_path / "y.pth")


# ---------------------------------------------------------------------------- the trainer
TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "16", "--workers",
        "0", "--threads", "1", "--print-freq", "2", "--head", "cosface", "--scale", "16",
        "--margin", "0.1", "--lr", "0.1"]


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return str(make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=20,
                             per_class=4, seed=2))


def backbone_of(path):
    return torch.load(path, weights_only=True)["model"]


def test_init_from_then_resume_continues_the_new_run(tiny_rec, tmp_path):
    src = str(tmp_path / "source")
    assert main(["--train-rec", tiny_rec, *TINY, "--max-steps", "6", "--save-path", src]) == 0
    source = backbone_of(os.path.join(src, "last.pth"))
    new, straight = str(tmp_path / "new"), str(tmp_path / "straight")
    init = ["--init-from", os.path.join(src, "last.pth"), "--freeze-backbone-steps", "3",
            "--lr", "0.05"]
    assert main(["--train-rec", tiny_rec, *TINY, *init, "--max-steps", "3",
                 "--save-path", new]) == 0
    ck = torch.load(os.path.join(new, "last.pth"), weights_only=True)
    assert ck["step"] == 3
    # frozen for all 3 steps: the backbone (BN statistics included) is the source's
    assert all(torch.equal(v, source[k]) for k, v in ck["model"].items())
    assert not torch.equal(ck["head"]["weight"], torch.load(
        os.path.join(src, "last.pth"), weights_only=True)["head"]["weight"])
    # the resumed run takes nothing from --init-from's source, and may not be given it
    assert parse_args(["--resume", new]).init_from is None
    assert main(["--resume", new, "--init-from", os.path.join(src, "last.pth")]) == 2
    summary = run(parse_args(["--resume", new, "--max-steps", "7"]))
    assert summary["start_step"] == 3 and summary["steps"] == 7
    assert main(["--train-rec", tiny_rec, *TINY, *init, "--max-steps", "7",
                 "--save-path", straight]) == 0
    resumed, whole = backbone_of(os.path.join(new, "last.pth")), \
        backbone_of(os.path.join(straight, "last.pth"))
    assert all(torch.equal(v, whole[k]) for k, v in resumed.items())  # = one straight run
    assert not torch.equal(resumed["fc.weight"], source["fc.weight"])  # trained after step 3


def test_init_from_errors_exit_2_and_strict_false_trains(tiny_rec, tmp_path, capsys):
    src = str(tmp_path / "source")
    assert main(["--train-rec", tiny_rec, *TINY, "--max-steps", "2", "--save-path", src]) == 0
    other = ["--train-rec", tiny_rec, *TINY, "--embedding-size", "8", "--max-steps", "2",
             "--init-from", os.path.join(src, "last.pth")]
    assert main([*other, "--save-path", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "fc.weight (file (16, 6272) vs model (8, 6272))" in err
    assert "--arch convnet-s --embedding-size 16" in err
    assert main([*other, "--init-strict", "false", "--save-path", str(tmp_path / "b")]) == 0
    assert main(["--train-rec", tiny_rec, *TINY, "--init-from", str(tmp_path / "nope.pth"),
                 "--save-path", str(tmp_path / "c")]) == 2
    assert "--init-from file not found" in capsys.readouterr().err


def test_freeze_under_ddp_equals_one_process(tmp_path):
    """2 gloo ranks at batch 8 = 1 process at batch 16 with --init-from and 2 frozen steps
    of 4 (the backbone's grads are all-reduced and dropped, then trained after step 2)."""
    from tests.test_train_dist import COMMON, assert_close_runs, load, torchrun

    rec = make_tiny_rec(tmp_path / "data", num_classes=40, per_class=4, seed=1)
    src = str(tmp_path / "src")
    assert main(["--train-rec", str(rec), *COMMON, "--batch-size", "16", "--max-steps", "2",
                 "--save-path", src]) == 0
    source = backbone_of(os.path.join(src, "last.pth"))
    init = ["--init-from", os.path.join(src, "last.pth"), "--freeze-backbone-steps", "2",
            "--max-steps", "4"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["--train-rec", str(rec), *COMMON, *init, "--batch-size", "16",
                 "--save-path", one]) == 0
    torchrun(2, ["--train-rec", str(rec), *COMMON, *init, "--batch-size", "8",
                 "--save-path", two])
    assert_close_runs(load(one), load(two), steps=4)
    trained = backbone_of(os.path.join(two, "last.pth"))
    assert not torch.equal(trained["fc.weight"], source["fc.weight"])
    frozen = str(tmp_path / "frozen")
    torchrun(2, ["--train-rec", str(rec), *COMMON, *init, "--max-steps", "2", "--batch-size",
                 "8", "--save-path", frozen])
    assert all(torch.equal(v, source[k]) for k, v in
               backbone_of(os.path.join(frozen, "last.pth")).items())
