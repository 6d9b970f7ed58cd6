"""Image-list dataset and the deterministic train/val split."""
import numpy as np
import pytest
import torch
from PIL import Image

from hfsoftmax.data.filelist import ImageListDataset, read_list, split_train_val, write_list
from hfsoftmax.data.image import CorruptImageError
from hfsoftmax.data.transforms import train_transform


def _make_images(root, n_classes=3, per_class=4, size=112):
    items = []
    for c in range(n_classes):
        (root / f"id {c}").mkdir(parents=True)  # a space in the path on purpose
        for k in range(per_class):
            arr = np.full((size, size, 3), 20 * c + k, np.uint8)
            arr[:, : size // 2, 0] = 255  # left half red: a flip is visible
            rel = f"id {c}/{k}.png"
            Image.fromarray(arr).save(root / rel)
            items.append((rel, c))
    return items


def test_list_dataset_reads_images_and_labels(tmp_path):
    items = _make_images(tmp_path / "imgs")
    write_list(tmp_path / "train.lst", items)
    assert read_list(tmp_path / "train.lst") == items
    ds = ImageListDataset(tmp_path / "train.lst", tmp_path / "imgs")
    assert len(ds) == 12 and ds.num_classes == 3
    x, y = ds[5]
    assert y == 1 and x.shape == (3, 112, 112)
    assert torch.allclose(x[1], torch.full((112, 112), (21 / 255 - 0.5) / 0.5))
    # training transform: flip with p=1 mirrors the red half
    flipped = ImageListDataset(tmp_path / "train.lst", tmp_path / "imgs",
                               transform=train_transform(flip_p=1.0))[5][0]
    assert torch.equal(flipped, x.flip(-1))


def test_resize_when_size_differs(tmp_path, caplog):
    items = _make_images(tmp_path / "imgs", 1, 1, size=64)
    write_list(tmp_path / "l.lst", items)
    ds = ImageListDataset(tmp_path / "l.lst", tmp_path / "imgs")
    with caplog.at_level("WARNING"):
        assert ds[0][0].shape == (3, 112, 112)
    assert "resizing to 112x112" in caplog.text


def test_list_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.lst").write_text("a.jpg 0\nb.jpg x\n")
    with pytest.raises(ValueError, match=r"bad\.lst:2: expected 'relative/path label'"):
        read_list(tmp_path / "bad.lst")
    items = _make_images(tmp_path / "imgs", 1, 2)
    (tmp_path / "imgs" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    write_list(tmp_path / "l.lst", items + [("missing.jpg", 0), ("junk.jpg", 0)])
    ds = ImageListDataset(tmp_path / "l.lst", tmp_path / "imgs")
    with pytest.raises(CorruptImageError, match=r"missing\.jpg .*cannot read"):
        ds[2]
    with pytest.raises(CorruptImageError, match=r"junk\.jpg .*undecodable"):
        ds[3]
    sk = ImageListDataset(tmp_path / "l.lst", tmp_path / "imgs", skip_corrupt=True)
    assert [sk[i] is None for i in range(4)] == [False, False, True, True]
    assert sk.num_skipped == 2
    with pytest.raises(ValueError, match="num_classes=1"):
        write_list(tmp_path / "hi.lst", [("id 0/0.png", 3)])
        ImageListDataset(tmp_path / "hi.lst", tmp_path / "imgs", num_classes=1)


def test_split_is_deterministic_per_class_and_order_free():
    items = [(f"{c}/{k}.jpg", c) for c in range(50) for k in range(10)]
    items.append(("single/0.jpg", 50))  # one-image class stays in train
    train, val = split_train_val(items, 0.2, seed=3)
    assert len(val) == 100 and len(train) == 401
    assert set(train) | set(val) == set(items) and not set(train) & set(val)
    for c in range(50):
        assert sum(1 for _, lab in val if lab == c) == 2
    assert ("single/0.jpg", 50) in train
    assert split_train_val(list(reversed(items)), 0.2, seed=3)[1] == list(reversed(val))
    assert set(split_train_val(items, 0.2, seed=4)[1]) != set(val)
    assert split_train_val(items, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_ratio"):
        split_train_val(items, 1.0)
