"""KittiDataset over the official layout, batching and loaders (kd_bnn.data.dataset / loader)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kd_bnn.config import AugmentConfig, DataConfig
from kd_bnn.data import (
    Batch,
    KittiDataset,
    KittiDatasetError,
    KittiDataWarning,
    KittiFormatError,
    build_datasets,
    build_loader,
    collate,
    eval_transforms,
    letterbox_to_original,
    read_label_file,
    train_transforms,
)

SIZE = (96, 320)  # small input size keeps these tests fast


@pytest.fixture(scope="module")
def sample_root(shared_kitti: Path) -> Path:
    root = shared_kitti / "sample"
    if not (root / "training" / "image_2").is_dir():
        pytest.skip(f"six-frame KITTI sample not found at {root}")
    return root


def make_root(tmp_path: Path, frames: dict[str, list[str]], images: list[str] | None = None,
              splits: dict[str, list[str]] | None = None) -> Path:
    """A tiny KITTI root: 40x120 PNGs and label files with the given lines."""
    root = tmp_path / "kitti"
    (root / "training" / "image_2").mkdir(parents=True)
    (root / "training" / "label_2").mkdir(parents=True)
    for fid in frames if images is None else images:
        img = np.full((40, 120, 3), 80, np.uint8)
        img[:, :, 0] = 10 * (int(fid) % 20)  # blue (channel 0 in BGR) marks the frame
        cv2.imwrite(str(root / "training" / "image_2" / f"{fid}.png"), img)
    for fid, lines in frames.items():
        (root / "training" / "label_2" / f"{fid}.txt").write_text("".join(x + "\n" for x in lines))
    for name, ids in (splits or {}).items():
        (root / "ImageSets").mkdir(exist_ok=True)
        (root / "ImageSets" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def line(typ: str, box=(10, 5, 30, 25)) -> str:
    return f"{typ} 0.00 0 0.00 {box[0]:.2f} {box[1]:.2f} {box[2]:.2f} {box[3]:.2f} 1.5 1.6 3.9 1 1 10 0.1"


# ----------------------------------------------------------------------------- real sample frames
def test_sample_loads_with_classes_and_dontcare(sample_root):
    ds = KittiDataset(sample_root, None)
    assert len(ds) == 6 and ds.ids == [f"{i:06d}" for i in range(6)]
    cmap = {"Car": 0, "Pedestrian": 1, "Cyclist": 2}
    for i in range(len(ds)):
        s = ds[i]
        gt = read_label_file(sample_root / "training" / "label_2" / f"{i:06d}.txt")
        keep = np.array([t in cmap for t in gt.types], bool)
        dc = np.array([t == "DontCare" for t in gt.types], bool)
        assert s["image"].dtype == torch.float32 and s["image"].shape[0] == 3
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        np.testing.assert_allclose(s["boxes"].numpy(), gt.boxes[keep], atol=1e-4)
        assert s["labels"].tolist() == [cmap[t] for t in gt.types[keep]]
        assert s["labels"].dtype == torch.int64
        np.testing.assert_allclose(s["ignore"].numpy(), gt.boxes[dc].reshape(-1, 4), atol=1e-4)
        h, w = s["image"].shape[1:]
        assert s["meta"]["orig_size"] == (h, w) and s["meta"]["image_id"] == f"{i:06d}"
    assert ds.type_counts["Truck"] == 1 and ds.type_counts["DontCare"] == 15 and not ds.unknown_types
    # image is RGB: channels reversed with respect to OpenCV's BGR
    bgr = cv2.imread(str(sample_root / "training" / "image_2" / "000003.png"))
    np.testing.assert_allclose(ds[3]["image"].permute(1, 2, 0).numpy(), bgr[..., ::-1] / 255.0, atol=1e-6)


def test_sample_merge_and_class_subset(sample_root):
    ds = KittiDataset(sample_root, None, classes=["Car", "Cyclist"], merge={"Truck": "Car", "Misc": "Cyclist"})
    s1, s2 = ds[1], ds[2]  # 000001: Truck, Car, Cyclist; 000002: Misc, Car
    assert s1["labels"].tolist() == [0, 0, 1]
    assert s2["labels"].tolist() == [1, 0]
    assert len(ds[0]["labels"]) == 0  # 000000 holds one Pedestrian, not a class here


def test_sample_eval_letterbox_round_trip(sample_root):
    ds = KittiDataset(sample_root, None, transforms=eval_transforms((384, 1248)))
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 384, 1248)
        gt = ds.frame_labels(i)
        for key, types in (("boxes", ("Car", "Pedestrian", "Cyclist")), ("ignore", ("DontCare",))):
            keep = np.isin(gt.types, types)
            back = letterbox_to_original(s[key], s["meta"])
            torch.testing.assert_close(back, torch.tensor(gt.boxes[keep], dtype=torch.float32).view(-1, 4),
                                       atol=1e-3, rtol=0)


def test_sample_split_file_and_max_images(sample_root, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("000004\n000001\n000003\n")
    ds = KittiDataset(sample_root, ids, max_images=2)
    assert ds.ids == ["000004", "000001"] and len(ds) == 2
    assert ds[0]["meta"]["image_id"] == "000004"


def test_sample_train_loader_batches(sample_root):
    ds = KittiDataset(sample_root, None, transforms=train_transforms(SIZE, AugmentConfig()))
    loader = build_loader(ds, batch_size=4, shuffle=True, workers=0, seed=0)
    assert len(loader) == 1  # drop_last for training: 6 frames -> one batch of 4
    b = next(iter(loader))
    assert isinstance(b, Batch) and b.images.shape == (4, 3, *SIZE)
    assert b.targets.shape[1] == 6 and set(b.targets[:, 0].long().tolist()) <= {0, 1, 2, 3}
    assert len(b.ignore) == 4 and len(b.meta) == 4
    x = b.targets[:, 2:]
    assert (x[:, 0] >= 0).all() and (x[:, 2] <= SIZE[1]).all() and (x[:, 1] >= 0).all() and (x[:, 3] <= SIZE[0]).all()
    again = next(iter(build_loader(ds, batch_size=4, shuffle=True, workers=0, seed=0)))
    assert torch.equal(again.images, b.images) and torch.equal(again.targets, b.targets)
    other = next(iter(build_loader(ds, batch_size=4, shuffle=True, workers=0, seed=1)))
    assert not torch.equal(other.images, b.images)


def test_sample_loader_with_workers_is_reproducible(sample_root):
    ds = KittiDataset(sample_root, None, transforms=train_transforms(SIZE, AugmentConfig(crop=1.0)))

    def run(seed):
        loader = build_loader(ds, batch_size=2, shuffle=True, workers=2, seed=seed)
        return [(b.images.clone(), b.targets.clone(), [m["image_id"] for m in b.meta]) for b in loader]

    a, b = run(5), run(5)
    assert len(a) == 3
    loader = build_loader(ds, batch_size=6, shuffle=False, workers=1, seed=5)
    epoch1, epoch2 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(epoch1.images, epoch2.images)  # a new augmentation stream each epoch
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    # the two workers do not repeat one augmentation stream: scales differ across the batches
    assert len({round(float(t[0].mean()), 6) for t in a}) == 3


# ----------------------------------------------------------------------------- collate
def test_collate_shapes_and_image_indices():
    def sample(k, m):
        return {"image": torch.zeros(3, 8, 16), "boxes": torch.arange(4 * k, dtype=torch.float32).view(k, 4),
                "labels": torch.full((k,), 2), "ignore": torch.ones(m, 4), "meta": {"image_id": str(k)}}

    b = collate([sample(2, 1), sample(0, 0), sample(3, 2)])
    assert b.images.shape == (3, 3, 8, 16) and len(b) == 3
    assert b.targets.shape == (5, 6) and b.targets.dtype == torch.float32
    assert b.targets[:, 0].tolist() == [0, 0, 2, 2, 2]
    assert b.targets[:, 1].tolist() == [2] * 5
    assert torch.equal(b.targets[2:, 2:], torch.arange(12, dtype=torch.float32).view(3, 4))
    assert [t.shape[0] for t in b.ignore] == [1, 0, 2]
    assert [m["image_id"] for m in b.meta] == ["2", "0", "3"]
    moved = b.to("cpu")
    assert moved.images.device.type == "cpu" and moved.meta is b.meta
    empty = collate([sample(0, 0)])
    assert empty.targets.shape == (0, 6)
    with pytest.raises(ValueError, match="different sizes"):
        collate([sample(1, 0), {**sample(1, 0), "image": torch.zeros(3, 9, 16)}])


# ----------------------------------------------------------------------------- tiny synthetic roots
def test_unknown_types_counted_and_ignored(tmp_path):
    root = make_root(tmp_path, {"000000": [line("Car"), line("Bus"), line("Van"), line("DontCare")],
                                "000001": [line("Bus"), line("Spaceship"), line("Cyclist", (50, 5, 60, 35))]})
    with pytest.warns(KittiDataWarning, match=r"3 object\(s\) of unknown type ignored: 'Bus' x2, 'Spaceship' x1"):
        ds = KittiDataset(root, None)
    assert ds.unknown_types == {"Bus": 2, "Spaceship": 1}
    assert ds[0]["labels"].tolist() == [0] and ds[0]["ignore"].shape == (1, 4)
    assert ds[1]["labels"].tolist() == [2]
    # BGR -> RGB: the blue-channel mark of frame 1 is in RGB channel 2
    assert abs(float(ds[1]["image"][2].mean()) - 10 / 255) < 1e-6


def test_split_by_name_in_imagesets(tmp_path):
    root = make_root(tmp_path, {f"{i:06d}": [line("Car")] for i in range(4)},
                     splits={"train": ["000000", "000002"], "val": ["000001", "000003"]})
    assert KittiDataset(root, "train").ids == ["000000", "000002"]
    assert KittiDataset(root / "training", None).ids == [f"{i:06d}" for i in range(4)]  # root = training/
    tr, va = build_datasets(DataConfig(root=str(root), input_size=SIZE))
    assert tr.ids == ["000000", "000002"] and va.ids == ["000001", "000003"]
    assert tr[0]["image"].shape == (3, *SIZE) and va[1]["image"].shape == (3, *SIZE)
    assert va[0]["meta"]["flipped"] is False


def test_missing_root_explains_how_to_get_data(tmp_path):
    for call in (lambda: KittiDataset(tmp_path / "nope", None),
                 lambda: build_datasets(DataConfig(root=str(tmp_path / "nope")))):
        with pytest.raises(FileNotFoundError) as err:
            call()
        msg = str(err.value)
        assert "cvlibs.net" in msg and "data/kitti/training/image_2" in msg and "label_2" in msg
        assert "python tools/make_synthetic.py --out data/synthetic" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="image_2"):
        KittiDataset(tmp_path / "empty", None)


def test_image_without_label_and_label_without_image(tmp_path):
    root = make_root(tmp_path / "a", {"000000": [line("Car")]}, images=["000000", "000007", "000009"])
    with pytest.raises(FileNotFoundError, match=r"no label file for 2 image\(s\).*000007, 000009"):
        KittiDataset(root, None)
    root = make_root(tmp_path / "b", {"000000": [line("Car")], "000005": [line("Car")]}, images=["000000"])
    with pytest.raises(FileNotFoundError, match=r"1 frame\(s\) without an image.*000005"):
        KittiDataset(root, None)
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{i:06d}\n" for i in range(12)))
    with pytest.raises(FileNotFoundError) as err:
        KittiDataset(root, ids)
    msg = str(err.value)
    assert "ids.txt" in msg
    assert "11 frame(s) without an image" in msg and "000001, 000002, 000003, 000004, 000005, ... (11 in all)" in msg
    assert "10 frame(s) without a label" in msg and "000004, 000006, ... (10 in all)" in msg


def test_empty_split_and_bad_arguments(tmp_path):
    root = make_root(tmp_path, {"000000": [line("Car")]}, splits={"empty": []})
    with pytest.raises(KittiFormatError, match="empty"):
        KittiDataset(root, "empty")
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        KittiDataset(root, "trainval")
    empty_root = make_root(tmp_path / "e", {}, images=[])
    with pytest.raises(KittiDatasetError, match="empty split"):
        KittiDataset(empty_root, None)
    with pytest.raises(KittiDatasetError, match="classes"):
        KittiDataset(root, None, classes=["Car", "Bus"])
    with pytest.raises(KittiDatasetError, match="merge"):
        KittiDataset(root, None, merge={"Van": "Truck"})
    with pytest.raises(KittiDatasetError, match="max_images"):
        KittiDataset(root, None, max_images=0)


def test_malformed_label_names_file_and_line(tmp_path):
    root = make_root(tmp_path, {"000000": [line("Car"), "Car 0.00 0 0.00 1 2 x 4 1 1 1 1 1 1 1"]})
    with pytest.raises(KittiFormatError, match=r"000000\.txt:2: field 'x2'"):
        KittiDataset(root, None)


def test_sample_train_meta_maps_boxes_back_to_labels(sample_root):
    """letterbox_to_original inverts the train geometry too (flip, random scale, crop)."""
    ds = KittiDataset(sample_root, None)
    cmap = {"Car": 0, "Pedestrian": 1, "Cyclist": 2}
    for i in range(len(ds)):
        ds.transforms = train_transforms((192, 640), AugmentConfig(crop=1.0, hflip=float(i % 2)), seed=i)
        s = ds[i]
        assert s["meta"]["flipped"] == bool(i % 2)
        back = letterbox_to_original(s["boxes"], s["meta"], clip=False).numpy()
        gt = ds.frame_labels(i)
        gt_labels = np.array([cmap.get(t, -1) for t in gt.types])
        for b, lab in zip(back, s["labels"].numpy()):
            cand = gt.boxes[gt_labels == lab]
            # a kept box is its label box, or that box clipped by the crop (contained in it)
            inside = ((b[:2] >= cand[:, :2] - 1e-3) & (b[2:] <= cand[:, 2:] + 1e-3)).all(1)
            assert inside.any(), (i, b, cand)


def test_small_split_keeps_its_only_batch_and_distributed_sampler(tmp_path):
    import torch.distributed as dist

    root = make_root(tmp_path, {f"{i:06d}": [line("Car")] for i in range(3)})
    ds = KittiDataset(root, None, transforms=train_transforms(SIZE, AugmentConfig()))
    assert [len(b) for b in build_loader(ds, batch_size=4, shuffle=True)] == [3]  # not dropped
    assert [len(b) for b in build_loader(ds, batch_size=2, shuffle=True)] == [2]  # drop_last
    assert [len(b) for b in build_loader(ds, batch_size=2, shuffle=False)] == [2, 1]
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_loader(ds, batch_size=2, shuffle=True, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, batch_size=2, shuffle=True, distributed=True, seed=0)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(1)
        assert [len(b) for b in loader] == [2]
    finally:
        dist.destroy_process_group()
