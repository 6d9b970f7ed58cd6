"""docs/workflow.md: every command in its code blocks runs, in order, as written (tiny data
under the names the document uses; small-size flags appended, which argparse lets win)."""
from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ijb_data import make_ijb

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "workflow.md"
SMALL = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "6", "--workers",
         "0", "--threads", "1", "--max-steps", "4", "--sample-num", "6", "--val-every", "2",
         "--freeze-backbone-steps", "2", "--print-freq", "1"]


def commands() -> list[list[str]]:
    text = DOC.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                out.append(shlex.split(line))
    return out


def make_faces(folder: Path, classes: int = 6, per_class: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"id{c}").mkdir(parents=True)
        base = rng.uniform(0, 255, (7, 7, 3))
        for i in range(per_class):
            img = np.kron(base, np.ones((16, 16, 1))) + rng.normal(0, 8, (112, 112, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
            (folder / f"id{c}" / f"{i}.jpg").write_bytes(buf.getvalue())


def rows_file(run: Path) -> str:
    ck = torch.load(run / "last.pth", weights_only=True)
    return str(run / ck["ps_snapshot"])


def test_every_documented_command_runs(tmp_path):
    from hfsoftmax.models import build_backbone

    cmds = commands()
    kinds = [" ".join(c[:3]) for c in cmds]
    assert kinds == ["python tools/img2rec.py --image-folder", "python -m hfsoftmax.train",
                     "python -m hfsoftmax.train", "scripts/eval_ijb.sh runs/ft/last.pth "
                     "IJB_release/IJBC", "python -m hfsoftmax.export", "python -m "
                     "paramserver.export", "python -m hfsoftmax.train", "python -m "
                     "paramserver.reshard"], kinds
    make_faces(tmp_path / "faces")
    make_ijb(tmp_path / "IJB_release" / "IJBC", num_ids=4, templates_per_id=2, impostors=20)
    torch.save(build_backbone("convnet-s", 16).state_dict(), tmp_path / "backbone.pth")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    extra = {0: ["--val-ratio", "0.2", "--workers", "2", "--no-progress"], 1: SMALL,
             2: ["--max-steps", "6"], 3: ["--workers", "0", "--no-progress"], 6: SMALL}
    for i, cmd in enumerate(cmds):
        if cmd[0] == "python":
            cmd = [sys.executable, *cmd[1:]]
            if cmd[1].startswith("tools/"):
                cmd[1] = str(ROOT / cmd[1])
        else:
            cmd = ["sh", str(ROOT / cmd[0]), *cmd[1:]]
        if "paramserver.export" in cmd:
            cmd[cmd.index("paramserver.export") + 1] = rows_file(tmp_path / "runs" / "ft")
        if "paramserver.reshard" in cmd:
            cmd[cmd.index("paramserver.reshard") + 1] = rows_file(tmp_path / "runs" / "ft2")
        r = subprocess.run([*cmd, *extra.get(i, [])], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-4000:])
    assert (tmp_path / "faces_rec" / "val.lst").read_text().count("\n") == 6
    assert "heldout_top1" in (tmp_path / "runs" / "ft" / "val.csv").read_text()
    assert "--init-from" in (tmp_path / "runs" / "ft" / "train.log").read_text()
    assert torch.load(tmp_path / "runs" / "ft" / "last.pth", weights_only=True)["step"] == 6
    assert (tmp_path / "runs" / "ft" / "ijbc" / "ijbc.json").is_file()
    assert (tmp_path / "runs" / "ft" / "export" / "backbone.onnx").is_file()
    assert np.load(tmp_path / "rows.npy").shape == (6, 16)
    base = rows_file(tmp_path / "runs" / "ft2")
    assert all(os.path.isfile(f"{base}.{i:05d}-of-00003") for i in range(3))
