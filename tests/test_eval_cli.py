"""hfsoftmax.eval: evaluate_model, the CLI and scripts/eval.sh, on the fixture and synthetic data.

The "matches a direct call" test re-derives everything eval.sh prints from a tiny trained
model with its own code (forward + flip, numpy normalisation) and evaluation.evaluate().
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import evaluate, table_row
from hfsoftmax.data.transforms import normalize_uint8
from hfsoftmax.data.verification import decode_pairs, load_bin
from hfsoftmax.eval import KNOWN_BINS, evaluate_model, find_bins, main
from hfsoftmax.extract import load_verification_set
from hfsoftmax.models import build_backbone
from tests.bin_utils import memo_bomb

ROOT = Path(__file__).resolve().parents[1]
ARCH, DIM = "convnet-s", 16

torch.set_num_threads(1)


def subprocess_env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, shared_fixtures):
    """A dataset folder like a user's: the built-in synthetic set (train.rec + synthetic.bin)
    and the Python-2 fixture as lfw.bin."""
    from hfsoftmax.data.synthetic import make_synthetic

    d = tmp_path_factory.mktemp("dataset")
    make_synthetic(d, num_classes=24, images_per_class=4, seed=0, heldout_per_class=0,
                   family_size=4, num_pairs=60, workers=1)
    shutil.copy(shared_fixtures / "verification-py2.bin", d / "lfw.bin")
    return d


@pytest.fixture(scope="module")
def trained_ckpt(dataset_dir, tmp_path_factory):
    """A tiny backbone trained a few steps (softmax over the 24 synthetic identities), saved
    as the trainer's checkpoint dict."""
    from hfsoftmax.data.insightface import InsightFaceRecDataset

    torch.manual_seed(0)
    ds = InsightFaceRecDataset(dataset_dir)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    model = build_backbone(ARCH, embedding_size=DIM)
    head = torch.nn.Linear(DIM, ds.num_classes)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    for step in range(24):
        idx = torch.randperm(len(ds))[:32]
        loss = F.cross_entropy(head(model(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "head": head.state_dict(), "optimizer": {},
                "lr_scheduler": {}, "step": 24, "epoch": 8,
                "args": {"arch": ARCH, "embedding_size": DIM}, "ps_snapshot": None}, path)
    return path


def direct_results(ckpt_path, dataset_dir, batch_size):
    """Everything by hand: load the weights, forward image + mirror, normalise, evaluate."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = build_backbone(ckpt["args"]["arch"], ckpt["args"]["embedding_size"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    out = {}
    for name in ("lfw", "synthetic"):
        bins, issame = load_bin(dataset_dir / f"{name}.bin")
        images = decode_pairs(bins)
        parts = []
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                x = normalize_uint8(images[s:s + batch_size])
                parts.append((model(x).double() + model(x.flip(3)).double()).numpy())
        emb = np.concatenate(parts)
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        out[name] = evaluate(emb, issame)
    return out


def test_find_bins_order_and_known_names(dataset_dir, tmp_path):
    assert [p.name for p in find_bins(dataset_dir)] == ["lfw.bin", "synthetic.bin"]
    assert KNOWN_BINS == ("lfw", "cfp_ff", "cfp_fp", "agedb_30", "calfw", "cplfw", "synthetic")
    assert find_bins(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        find_bins(tmp_path / "nope")


def test_eval_sh_matches_direct_call(dataset_dir, trained_ckpt, tmp_path):
    out = tmp_path / "outputs"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "eval.sh"), ARCH, str(trained_ckpt),
                        str(dataset_dir), str(out), "--batch-size", "16", "--no-progress"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "pairs"]
    direct = direct_results(trained_ckpt, dataset_dir, batch_size=16)
    for name, res in direct.items():
        row = "  ".join(table_row(name, res))
        assert any(" ".join(line.split()) == " ".join(row.split()) for line in lines), \
            (row, r.stdout)
        report = json.loads((out / f"{name}.json").read_text())
        assert report["fold_accuracies"] == res.fold_accuracies  # exact
        assert report["accuracy"] == res.accuracy and report["val"] == res.val
        assert report["best_threshold"] == res.best_threshold
        assert report["checkpoint"] == str(trained_ckpt)
        assert (out / f"{name}_roc.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == ["lfw", "synthetic"]
    # a comparison with teeth: the synthetic accuracy is neither chance nor perfect, so a
    # different threshold, fold or flip would show in the numbers
    assert 0.55 < direct["synthetic"].accuracy < 1.0, direct["synthetic"].accuracy
    assert direct["synthetic"].num_pairs == 60 and direct["lfw"].num_pairs == 20


def test_eval_sh_usage_and_empty_dataset(tmp_path):
    script = str(ROOT / "scripts" / "eval.sh")
    r = subprocess.run(["bash", script, ARCH, "m.pth"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_cli_errors_in_process(dataset_dir, trained_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--load-path", str(trained_ckpt), "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no verification .bin" in err and "agedb_30.bin" in err
    assert main(["--load-path", str(trained_ckpt), "--arch", "ir18",
                 "--data-dir", str(dataset_dir), "--out-dir", str(tmp_path / "o")]) == 2
    assert "trained with arch 'convnet-s' but 'ir18'" in capsys.readouterr().err
    assert main(["--load-path", str(trained_ckpt), "--bins", str(tmp_path / "x.bin")]) == 2
    assert "verification file not found" in capsys.readouterr().err
    assert main(["--load-path", str(trained_ckpt)]) == 2
    assert "give --bins and/or --data-dir" in capsys.readouterr().err
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    assert main(["--load-path", str(trained_ckpt), "--bins", str(evil)]) == 2
    assert "refused to load global" in capsys.readouterr().err


def test_cli_bins_flag_save_features_and_default_out_dir(trained_ckpt, shared_fixtures,
                                                          tmp_path, capsys):
    ckpt = tmp_path / "run" / "ckpt.pth"
    ckpt.parent.mkdir()
    shutil.copy(trained_ckpt, ckpt)
    fixture = shared_fixtures / "verification-py2.bin"
    assert main(["--load-path", str(ckpt), "--bins", str(fixture), "--save-features",
                 "--batch-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verification-py2" in out
    rep_dir = ckpt.parent / "verification"  # default: beside the checkpoint
    feats = np.load(rep_dir / "verification-py2.npy")
    issame = np.load(rep_dir / "verification-py2_issame.npy")
    assert feats.shape == (40, DIM) and issame.tolist() == [True, False] * 10
    # the saved features re-evaluated torch-free give the reported numbers exactly
    report = json.loads((rep_dir / "verification-py2.json").read_text())
    again = evaluate(feats, issame)
    assert report["fold_accuracies"] == again.fold_accuracies and report["val"] == again.val
    # and the torch-free CLI on those files prints the same table row
    from evaluation.__main__ import main as evaluation_main

    assert evaluation_main([str(rep_dir / "verification-py2.npy")]) == 0
    row = [line for line in out.splitlines() if line.startswith("verification-py2")]
    assert row and row[0] in capsys.readouterr().out


def test_evaluate_model_for_the_trainer(dataset_dir, trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    model = build_backbone(ARCH, DIM)
    model.load_state_dict(ckpt["model"])
    model.train()
    sets = [load_verification_set(dataset_dir / "synthetic.bin")]  # decoded once
    res = evaluate_model(model, sets, batch_size=32, out_dir=tmp_path / "ev",
                         report_extra={"step": 24})
    assert model.training  # restored
    assert list(res) == ["synthetic"] and res["synthetic"].num_pairs == 60
    by_path = evaluate_model(model, [dataset_dir / "synthetic.bin"], batch_size=32)
    assert by_path["synthetic"].fold_accuracies == res["synthetic"].fold_accuracies
    report = json.loads((tmp_path / "ev" / "synthetic.json").read_text())
    assert report["step"] == 24 and report["flip"] is True
    no_flip = evaluate_model(model, sets, batch_size=32, flip=False)
    assert no_flip["synthetic"].tpr != res["synthetic"].tpr  # the flag reaches the model
    with pytest.raises(ValueError, match="named 'synthetic'"):
        evaluate_model(model, [dataset_dir / "synthetic.bin", sets[0]])
    with pytest.raises(ValueError, match="no verification sets"):
        evaluate_model(model, [])


def test_cli_refuses_memo_amplified_bin_in_one_line(trained_ckpt, tmp_path):
    # one 100 KiB image stored once and referenced 30,000 times through the pickle memo: a
    # 200 KB file that would decode to 3 GB; refused before decoding, exit 2, one line
    bomb = tmp_path / "lfw.bin"
    bomb.write_bytes(memo_bomb(100 << 10, 30000))
    r = subprocess.run([sys.executable, "-m", "hfsoftmax.eval", "--load-path", str(trained_ckpt),
                        "--bins", str(bomb), "--out-dir", str(tmp_path / "o")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert str(bomb) in errors[0] and "refused" in errors[0] and "bound" in errors[0]
