"""RecordIO reader/writer and the InsightFace layout, against files written by real MXNet.

Hand-built files in these tests are assembled byte by byte from the format's spec (struct
calls below), not with the project's writer, so a shared misunderstanding cannot pass.
"""
import hashlib
import io
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from hfsoftmax.data.image import CorruptImageError, skip_none_collate
from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.recordio import (IRHeader, RecordIOError, RecordIOReader, RecordIOWriter,
                                     image_format, pack, unpack)
from hfsoftmax.data.transforms import eval_transform

MAGIC = 0xCED7230A


def spec_frame(payload: bytes, cflag: int = 0) -> bytes:
    """One RecordIO frame per the spec: magic, cflag<<29|len, payload, pad to 4 bytes."""
    return (struct.pack("<II", MAGIC, (cflag << 29) | len(payload)) + payload
            + b"\0" * ((-len(payload)) % 4))


def spec_record(flag, label, rid, payload, labels=()):
    """IRHeader (IfQQ) + optional float32 array labels + payload."""
    return (struct.pack("<IfQQ", flag, label, rid, 0)
            + struct.pack(f"<{len(labels)}f", *labels) + payload)


def write_spec_rec(folder, records, num_classes):
    """records: list of (key, record payload). Writes train.rec/.idx/property by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = bytearray(), []
    for key, payload in records:
        idx.append(f"{key}\t{len(rec)}\n")
        rec += spec_frame(payload)
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(idx))
    (folder / "property").write_text(f"{num_classes},112,112")


def encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def manifest(shared_fixtures):
    return json.loads((shared_fixtures / "insightface-rec" / "manifest.json").read_text())


@pytest.fixture()
def rec_copy(shared_fixtures, tmp_path):
    d = tmp_path / "rec"
    shutil.copytree(shared_fixtures / "insightface-rec", d)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


# -- 1. the MXNet-written fixture reads exactly as its manifest says ---------------------------

def test_fixture_matches_manifest(shared_fixtures, manifest):
    ds = InsightFaceRecDataset(shared_fixtures / "insightface-rec")
    assert ds.num_classes == manifest["identities"] == 12
    assert len(ds) == manifest["images"] == 42
    assert ds.keys == [r["idx"] for r in manifest["records"]]
    for i, r in enumerate(manifest["records"]):
        data, label = ds.read_raw(i)
        assert label == r["label"]
        assert {"jpg": "jpeg", "png": "png"}[image_format(data)] == r["format"]
        assert hashlib.md5(data).hexdigest() == r["md5"]
        img, lab = ds[i]
        assert lab == r["label"]
        assert img.shape == (3, manifest["image_size"], manifest["image_size"])
        assert img.dtype == torch.float32 and -1.0 <= img.min() and img.max() <= 1.0
    assert sorted(set(ds.labels().tolist())) == list(range(12))


def test_fixture_identity_records_match_labels(shared_fixtures, manifest):
    ds = InsightFaceRecDataset(shared_fixtures / "insightface-rec")
    ranges = ds.identity_ranges()
    assert len(ranges) == 12
    label_of = {r["idx"]: r["label"] for r in manifest["records"]}
    for cls, (a, b) in enumerate(ranges):
        assert b > a
        assert all(label_of[k] == cls for k in range(a, b))
    assert ranges[0][0] == 1 and ranges[-1][1] == 43


def test_scan_equals_index_reads(shared_fixtures):
    d = shared_fixtures / "insightface-rec"
    r = RecordIOReader(d / "train.rec", d / "train.idx")
    scanned = list(r.scan())
    assert len(scanned) == len(r) == 55
    for key, (off, payload) in zip(r.keys, scanned):
        assert r.offset(key) == off
        assert r.read_idx(key) == payload


def test_writer_reproduces_mxnet_bytes(shared_fixtures, tmp_path):
    """Re-writing every record of the MXNet file with our writer gives identical bytes."""
    d = shared_fixtures / "insightface-rec"
    r = RecordIOReader(d / "train.rec", d / "train.idx")
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
        for key in r.keys:
            header, body = unpack(r.read_idx(key))
            w.write_idx(key, pack(header, body))
    assert (tmp_path / "t.rec").read_bytes() == (d / "train.rec").read_bytes()
    assert (tmp_path / "t.idx").read_bytes() == (d / "train.idx").read_bytes()


# -- 2. array labels and PNG records ----------------------------------------------------------

def test_array_labels_and_png_records(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    payloads = [encode(imgs[0], "PNG"), encode(imgs[1], "JPEG"), encode(imgs[2], "PNG"),
                encode(imgs[3], "JPEG")]
    labels = [0, 0, 1, 1]
    records = [(0, spec_record(2, 0.0, 0, b"", (5.0, 7.0)))]
    # images with ARRAY labels (flag=3: class id first, then two extra values)
    for k, (p, lab) in enumerate(zip(payloads, labels), start=1):
        records.append((k, spec_record(3, 0.0, k, p, (float(lab), 0.25, -1.0))))
    records += [(5, spec_record(2, 0.0, 0, b"", (1.0, 3.0))),
                (6, spec_record(2, 0.0, 0, b"", (3.0, 5.0)))]
    write_spec_rec(tmp_path / "ds", records, num_classes=2)

    ds = InsightFaceRecDataset(tmp_path / "ds", transform=eval_transform())
    assert len(ds) == 4 and ds.num_classes == 2
    assert ds.identity_ranges() == [(1, 3), (3, 5)]
    for i in range(4):
        data, label = ds.read_raw(i)
        assert data == payloads[i] and label == labels[i]
        assert image_format(data) == ("png" if i % 2 == 0 else "jpg")
    # PNG is lossless: the decoded tensor is exactly the normalised source pixels
    x, lab = ds[0]
    want = torch.from_numpy(imgs[0]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert lab == 0 and torch.allclose(x, want, atol=1e-6)
    header, body = unpack(RecordIOReader(tmp_path / "ds" / "train.rec",
                                         tmp_path / "ds" / "train.idx").read_idx(1))
    assert header.flag == 3 and np.array_equal(header.label, np.float32([0, 0.25, -1]))
    assert body == payloads[0]


def test_pack_matches_spec_bytes():
    assert pack(IRHeader(0, 3.0, 9, 0), b"ab") == spec_record(0, 3.0, 9, b"ab")
    assert pack(IRHeader(0, [1.0, 2.0], 4, 0), b"xy") == spec_record(2, 0.0, 4, b"xy",
                                                                      (1.0, 2.0))


def test_flat_layout_without_identity_records(tmp_path):
    """Record 0 with flag=0 (older sets): every indexed key is an image."""
    img = encode(np.zeros((112, 112, 3), np.uint8), "JPEG")
    write_spec_rec(tmp_path / "flat", [(k, spec_record(0, float(k % 3), k, img))
                                       for k in range(6)], num_classes=3)
    ds = InsightFaceRecDataset(tmp_path / "flat")
    assert len(ds) == 6 and [ds[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_flat_layout_with_array_labels(tmp_path):
    """Record 0 being an image with an array label (no layout header): still a flat set."""
    img = encode(np.zeros((112, 112, 3), np.uint8), "PNG")
    write_spec_rec(tmp_path / "flat", [(k, spec_record(2, 0.0, k, img, (float(k % 2), 9.0)))
                                       for k in range(4)], num_classes=2)
    ds = InsightFaceRecDataset(tmp_path / "flat")
    assert len(ds) == 4 and [ds[i][1] for i in range(4)] == [0, 1, 0, 1]


def test_continuation_frames_roundtrip(tmp_path):
    """A payload holding the magic word at aligned offsets is split into parts (cflag 1, 2,
    3) exactly as dmlc-core does; the reader joins them back."""
    m = struct.pack("<I", MAGIC)
    payload = b"abcd" + m + b"efgh" + m + m + b"tail!"  # magic at 4, 12, 16 (aligned)
    unaligned = b"xy" + m + b"z"                         # magic at 2: not a split point
    with RecordIOWriter(tmp_path / "c.rec", tmp_path / "c.idx") as w:
        w.write_idx(0, payload)
        w.write_idx(1, unaligned)
    raw = (tmp_path / "c.rec").read_bytes()
    expected = (spec_frame(b"abcd", 1) + spec_frame(b"efgh", 2) + spec_frame(b"", 2)
                + spec_frame(b"tail!", 3))
    assert raw == expected + spec_frame(unaligned, 0)
    r = RecordIOReader(tmp_path / "c.rec", tmp_path / "c.idx")
    assert r.read_idx(0) == payload and r.read_idx(1) == unaligned
    assert [p for _, p in r.scan()] == [payload, unaligned]


# -- 4. corrupt files: clear errors naming the record ------------------------------------------

def test_truncated_rec(rec_copy):
    rec = rec_copy / "train.rec"
    data = rec.read_bytes()
    off_20 = int(dict(l.split("\t") for l in (rec_copy / "train.idx").read_text().split("\n")
                      if l)["20"])
    rec.write_bytes(data[:off_20 + 100])  # cut inside record 20
    ds = InsightFaceRecDataset(rec_copy)
    ds[0]  # earlier records still read
    with pytest.raises(RecordIOError, match=r"record 20 .*train\.rec.*truncated"):
        ds[19]
    with pytest.raises(RecordIOError, match=r"record 21 .*past the end"):
        ds[20]


def test_bad_magic(rec_copy):
    rec = rec_copy / "train.rec"
    r = RecordIOReader(rec, rec_copy / "train.idx")
    off = r.offset(7)
    data = bytearray(rec.read_bytes())
    data[off] ^= 0xFF
    rec.write_bytes(bytes(data))
    ds = InsightFaceRecDataset(rec_copy)
    with pytest.raises(RecordIOError, match=r"record 7 .*train\.rec.*bad magic"):
        ds[6]


def test_idx_offset_past_end(rec_copy):
    idx = rec_copy / "train.idx"
    lines = idx.read_text().splitlines()
    lines[9] = "9\t99999999"
    idx.write_text("\n".join(lines) + "\n")
    ds = InsightFaceRecDataset(rec_copy)
    with pytest.raises(RecordIOError, match=r"record 9 .*offset 99999999 is past the end"):
        ds[8]


def test_undecodable_image_raises_and_skip_counts(tmp_path):
    good = encode(np.full((112, 112, 3), 100, np.uint8), "JPEG")
    bad = good[:200]  # truncated JPEG
    junk = b"not an image at all"
    recs = [(0, spec_record(2, 0.0, 0, b"", (4.0, 5.0))),
            (1, spec_record(0, 0.0, 1, good)), (2, spec_record(0, 0.0, 2, bad)),
            (3, spec_record(0, 0.0, 3, junk)), (4, spec_record(2, 0.0, 0, b"", (1.0, 4.0)))]
    write_spec_rec(tmp_path / "ds", recs, num_classes=1)
    ds = InsightFaceRecDataset(tmp_path / "ds")
    assert ds[0][1] == 0
    with pytest.raises(CorruptImageError, match=r"record 2 of .*train\.rec: undecodable"):
        ds[1]
    with pytest.raises(CorruptImageError, match=r"record 3 of .*undecodable"):
        ds[2]
    skipping = InsightFaceRecDataset(tmp_path / "ds", skip_corrupt=True)
    assert skipping[1] is None and skipping[2] is None and skipping[0] is not None
    assert skipping.num_skipped == 2 and skipping.report_skipped() == 2
    # counted across DataLoader worker processes too, and collated without the skipped ones
    skipping2 = InsightFaceRecDataset(tmp_path / "ds", skip_corrupt=True)
    loader = torch.utils.data.DataLoader(skipping2, batch_size=3, num_workers=2,
                                         collate_fn=skip_none_collate)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches if b is not None) == 1
    assert skipping2.num_skipped == 2


def test_bad_label_names_record(tmp_path):
    img = encode(np.zeros((112, 112, 3), np.uint8), "JPEG")
    write_spec_rec(tmp_path / "ds", [(0, spec_record(0, 0.0, 0, img)),
                                     (1, spec_record(0, 5.0, 1, img))], num_classes=2)
    ds = InsightFaceRecDataset(tmp_path / "ds")
    with pytest.raises(RecordIOError, match=r"record 1 .*label 5.0 is not a class id in 0..1"):
        ds[1]
    write_spec_rec(tmp_path / "nan", [(0, spec_record(0, float("nan"), 0, img))], 2)
    with pytest.raises(RecordIOError, match=r"record 0 .*label nan is not a class id"):
        InsightFaceRecDataset(tmp_path / "nan")[0]


def test_missing_files_are_named(tmp_path, rec_copy):
    with pytest.raises(FileNotFoundError, match="not found"):
        InsightFaceRecDataset(tmp_path / "nope")
    (rec_copy / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        InsightFaceRecDataset(rec_copy)


# -- fork safety ------------------------------------------------------------------------------

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_same_data(shared_fixtures, context):
    torch.set_num_threads(1)
    ds = InsightFaceRecDataset(shared_fixtures / "insightface-rec")
    ds[0]  # the parent opens its map first: workers must not reuse it
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                         multiprocessing_context=context)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), ref)
    assert torch.cat(ys).tolist() == ds.labels().tolist()


# -- 5. claimed sizes are checked against the files before anything of that size is built -----

def small_identity_set(folder, labels, num_classes, header=None):
    """Record 0 + one JPEG image per label + one identity record per class, by hand."""
    img = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    n, ids = len(labels), sorted(set(labels))
    recs = [(0, spec_record(2, 0.0, 0, b"", header or (n + 1.0, n + 1.0 + len(ids))))]
    recs += [(k + 1, spec_record(0, float(lab), k + 1, img)) for k, lab in enumerate(labels)]
    recs += [(n + 1 + j, spec_record(2, 0.0, 0, b"", (1.0, 2.0))) for j in range(len(ids))]
    write_spec_rec(folder, recs, num_classes)
    return folder


def test_record0_claiming_3e8_images_is_refused_without_allocating(tmp_path):
    import tracemalloc

    d = small_identity_set(tmp_path / "ds", [0, 0, 1], 2, header=(3e8, 3e8 + 2))
    assert (d / "train.rec").stat().st_size < 3000
    tracemalloc.start()
    try:
        with pytest.raises(RecordIOError) as info:
            InsightFaceRecDataset(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "record 0 of" in msg and "train.rec" in msg
    assert "claims 299999999 images" in msg and "lists only 6 keys" in msg
    assert peak < 8 << 20  # no list of 3e8 keys (that would be > 2 GB)
    # identities are bounded by the .rec's size even when the images are all there
    d2 = small_identity_set(tmp_path / "ids", [0, 0, 1], 2, header=(4.0, 3e8))
    with pytest.raises(RecordIOError, match=r"claims 3 images and 299999996 identities, which "
                                            r"take at least \d+ bytes .* but the \.rec has"):
        InsightFaceRecDataset(d2)
    d3 = small_identity_set(tmp_path / "inf", [0], 1, header=(2.0, float("inf")))
    with pytest.raises(RecordIOError, match=r"identity range \[2.0, inf\) is invalid"):
        InsightFaceRecDataset(d3)


def test_index_longer_than_the_rec_can_hold_is_refused(tmp_path):
    d = small_identity_set(tmp_path / "ds", [0, 1], 2)
    rec_size = (d / "train.rec").stat().st_size
    cap = rec_size // 8
    lines = "".join(f"{k}\t0\n" for k in range(cap + 1))
    (d / "train.idx").write_text(lines)
    with pytest.raises(RecordIOError, match=rf"more than {cap} keys, but a {rec_size}-byte "
                                            r"\.rec holds at most"):
        RecordIOReader(d / "train.rec", d / "train.idx")
    (d / "train.idx").write_text("0\t0" + " " * (64 * (cap + 2)) + "\n")
    with pytest.raises(RecordIOError, match=r"too large for the index of a \d+-byte \.rec"):
        RecordIOReader(d / "train.rec", d / "train.idx")


def test_property_class_count_is_bounded(tmp_path, rec_copy):
    from hfsoftmax.data.insightface import read_property

    (rec_copy / "property").write_text("100000000000000,112,112")
    with pytest.raises(ValueError, match=r"property: num_classes 100000000000000 is above the "
                                         r"cap of 2147483648"):
        InsightFaceRecDataset(rec_copy)
    (rec_copy / "property").write_text(f"{2 ** 31},112,112")  # the cap itself is allowed
    assert InsightFaceRecDataset(rec_copy).num_classes == 2 ** 31
    (tmp_path / "p").write_text("10,112,99999999")
    with pytest.raises(ValueError, match=r"image size 112x99999999 is above 65535"):
        read_property(tmp_path / "p")


def test_property_below_the_largest_label_is_refused(tmp_path):
    d = small_identity_set(tmp_path / "ds", [0, 1, 2, 2], num_classes=2)
    with pytest.raises(ValueError, match=r"property: num_classes 2 is not above the largest "
                                         r"label 2 \(record 4, the last image of .*train\.rec\)"
                                         r".*at least 3 classes"):
        InsightFaceRecDataset(d)
    (d / "property").write_text("3,112,112")
    assert len(InsightFaceRecDataset(d)) == 4
    (d / "property").write_text("1000,112,112")  # more classes than images is fine
    assert InsightFaceRecDataset(d).num_classes == 1000


def test_huge_label_in_a_set_without_property_names_the_record(tmp_path):
    img = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    write_spec_rec(tmp_path / "ds", [(0, spec_record(0, 0.0, 0, img)),
                                     (1, spec_record(0, 3e38, 1, img))], num_classes=1)
    (tmp_path / "ds" / "property").unlink()
    with pytest.raises(RecordIOError, match=r"record 1 .*label 3\.\d+e\+38 is not a class id"):
        InsightFaceRecDataset(tmp_path / "ds")
