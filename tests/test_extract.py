"""hfsoftmax.extract: checkpoint loading, (image + flip) embeddings, the CLI and extract_feat.sh."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hfsoftmax.data.recordio import RecordIOReader, unpack
from hfsoftmax.data.transforms import eval_transform
from hfsoftmax.extract import (embed_batches, extract_filelist, extract_verification,
                               issame_path, load_backbone, load_checkpoint_args, resolve_device)
from hfsoftmax.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
ARCH, DIM = "convnet-s", 16

torch.set_num_threads(1)


def make_checkpoint(path, arch=ARCH, dim=DIM, seed=0, model=None, **overrides):
    """A checkpoint dict with the trainer's keys (see the module contracts)."""
    torch.manual_seed(seed)
    model = model if model is not None else build_backbone(arch, embedding_size=dim)
    ckpt = {"model": model.state_dict(), "head": None, "optimizer": {}, "lr_scheduler": {},
            "step": 7, "epoch": 1, "args": {"arch": arch, "embedding_size": dim, "lr": 0.1},
            "ps_snapshot": None}
    ckpt.update(overrides)
    torch.save(ckpt, path)
    return model


def subprocess_env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def rec_images(shared_fixtures, tmp_path_factory):
    """The insightface-rec fixture's images extracted to files plus an image list."""
    root = tmp_path_factory.mktemp("rec_images")
    rec = shared_fixtures / "insightface-rec"
    manifest = json.loads((rec / "manifest.json").read_text())
    lines = []
    with RecordIOReader(rec / "train.rec", rec / "train.idx") as reader:
        for r in manifest["records"]:
            _, payload = unpack(reader.read_idx(r["idx"]))
            rel = f"{r['label']}/{r['idx']}.{'jpg' if r['format'] == 'jpeg' else r['format']}"
            (root / "images" / str(r["label"])).mkdir(parents=True, exist_ok=True)
            (root / "images" / rel).write_bytes(payload)
            lines.append(f"{rel} {r['label']}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root, lines


def test_resolve_device():
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_backbone_from_trainer_checkpoint(tmp_path):
    model = make_checkpoint(tmp_path / "c.pth")
    loaded = load_backbone(tmp_path / "c.pth", "cpu")
    assert not loaded.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    state, args = load_checkpoint_args(tmp_path / "c.pth")
    assert args["arch"] == ARCH and args["embedding_size"] == DIM


def test_load_backbone_ddp_prefix_and_bare_state_dict(tmp_path):
    model = build_backbone(ARCH, embedding_size=DIM)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": ARCH, "embedding_size": DIM}}, tmp_path / "ddp.pth")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model.eval()(x)
        assert torch.equal(load_backbone(tmp_path / "ddp.pth", "cpu")(x), ref)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="pass --arch and --embedding-size"):
        load_backbone(tmp_path / "bare.pth")
    with torch.no_grad():
        got = load_backbone(tmp_path / "bare.pth", "cpu", arch=ARCH, embedding_size=DIM)(x)
    assert torch.equal(got, ref)


def test_load_backbone_errors(tmp_path):
    make_checkpoint(tmp_path / "c.pth")
    with pytest.raises(ValueError, match="trained with arch 'convnet-s' but 'ir18'"):
        load_backbone(tmp_path / "c.pth", arch="ir18")
    with pytest.raises(ValueError, match="embedding_size 16 but 32"):
        load_backbone(tmp_path / "c.pth", embedding_size=32)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "missing.pth")
    make_checkpoint(tmp_path / "wrongdim.pth", args={"arch": ARCH, "embedding_size": 8})
    with pytest.raises(ValueError, match="do not fit backbone"):
        load_backbone(tmp_path / "wrongdim.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="neither a trainer checkpoint"):
        load_backbone(tmp_path / "odd.pth")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _RunsCode()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_backbone(tmp_path / "evil.pth")


def test_embed_batches_is_flip_sum_normalised_and_restores_mode():
    torch.manual_seed(1)
    model = build_backbone(ARCH, embedding_size=DIM).train()
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    feats = embed_batches(model, [x[:3], x[3:]])
    assert model.training  # mode restored for the trainer
    model.eval()
    with torch.no_grad():
        ref = (model(x).double() + model(torch.flip(x, dims=[3])).double()).numpy()
        plain = model(x).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert feats.dtype == np.float32 and feats.shape == (5, DIM)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(embed_batches(model, [x], flip=False), plain, atol=1e-6)
    assert not np.allclose(ref, plain, atol=1e-3)  # the flip term matters
    # flip-sum is mirror-symmetric: an image and its mirror get the same embedding
    mirrored = embed_batches(model, [torch.flip(x, dims=[3])])
    np.testing.assert_allclose(mirrored, feats, atol=1e-5)


def test_extract_filelist_order_and_values(rec_images):
    root, lines = rec_images
    torch.manual_seed(2)
    model = build_backbone(ARCH, embedding_size=DIM).eval()
    feats = extract_filelist(model, root / "list.txt", root / "images", batch_size=16)
    assert feats.shape == (42, DIM)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    tf = eval_transform()
    for i in (0, 17, 41):  # row i is list line i
        img = Image.open(root / "images" / lines[i].split()[0]).convert("RGB")
        x = tf(img)[None]
        with torch.no_grad():
            v = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()[0]
        np.testing.assert_allclose(feats[i], v / np.linalg.norm(v), atol=1e-5)


def test_extract_verification_fixture_bin(shared_fixtures):
    torch.manual_seed(3)
    model = build_backbone(ARCH, embedding_size=DIM)
    feats, issame = extract_verification(model, shared_fixtures / "verification-py2.bin",
                                         batch_size=7)
    assert feats.shape == (40, DIM) and issame.tolist() == [True, False] * 10
    feats2, _ = extract_verification(model, shared_fixtures / "verification-py2.bin",
                                     batch_size=40)
    np.testing.assert_allclose(feats, feats2, atol=1e-5)  # batching does not change results
    with pytest.raises(ValueError, match="batch_size"):
        extract_verification(model, shared_fixtures / "verification-py2.bin", batch_size=0)


def test_extract_cli_bin_writes_features_and_labels(tmp_path, shared_fixtures, capsys):
    from hfsoftmax.extract import main

    make_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "feats" / "pairs.npy"
    assert main(["--load-path", str(tmp_path / "c.pth"), "--bin",
                 str(shared_fixtures / "verification-py2.bin"), "--out", str(out),
                 "--batch-size", "16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "wrote 40 x 16 features" in captured.out
    assert "100%" in captured.err  # the tqdm progress bar ran to the end
    assert np.load(out).shape == (40, DIM)
    assert np.load(issame_path(out)).tolist() == [True, False] * 10
    assert issame_path(out).name == "pairs_issame.npy"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_extract_cli_user_errors_exit_2_without_traceback(tmp_path, rec_images, capsys):
    from hfsoftmax.extract import main

    root, _ = rec_images
    assert main(["--load-path", str(tmp_path / "nope.pth"), "--filelist",
                 str(root / "list.txt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    make_checkpoint(tmp_path / "c.pth")
    assert main(["--load-path", str(tmp_path / "c.pth"), "--filelist",
                 str(tmp_path / "missing.lst")]) == 2
    assert "missing.lst" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--load-path", str(tmp_path / "c.pth"), "--filelist",
                     str(root / "list.txt"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one of --filelist / --bin
        main(["--load-path", str(tmp_path / "c.pth")])


def test_extract_feat_sh_on_image_list(tmp_path, rec_images):
    """The script end to end (default output name), equal to a direct call."""
    root, lines = rec_images
    model = make_checkpoint(tmp_path / "c.pth", seed=4)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "extract_feat.sh"), str(root / "images"),
                        str(root / "list.txt"), str(tmp_path / "c.pth")], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    feats = np.load(tmp_path / "features.npy")
    assert feats.shape == (len(lines), DIM) and feats.dtype == np.float32
    direct = extract_filelist(model.eval(), root / "list.txt", root / "images")
    np.testing.assert_allclose(feats, direct, atol=1e-5)


def test_extract_feat_sh_usage():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "extract_feat.sh"), "only-two", "args"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
