"""The trainer on the real pipeline: synthetic KITTI -> build_datasets/build_loader (augmented,
shuffled) -> Darknet teacher -> KITTI evaluation; resume is exact through the augmentation too."""

from __future__ import annotations

import functools

import pytest
import torch

from kd_bnn.config import DataConfig, TrainConfig
from kd_bnn.engine import Trainer, evaluate_model, kitti_ground_truth, load_checkpoint

synthetic = pytest.importorskip("kd_bnn.data.synthetic")
loader_mod = pytest.importorskip("kd_bnn.data.loader")
models = pytest.importorskip("kd_bnn.models")

SIZE = (64, 224)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, num=8, seed=0, size=(448, 136), val_fraction=0.25)
    return root


def _trainer(run_dir, data_root, cfg, seed=0, **kw):
    dcfg = DataConfig(root=str(data_root), input_size=SIZE, batch_size=3)
    train_ds, val_ds = loader_mod.build_datasets(dcfg)
    train = loader_mod.build_loader(train_ds, 3, shuffle=True, seed=5 + seed)
    val = loader_mod.build_loader(val_ds, 3, shuffle=False)
    torch.manual_seed(seed)
    model = models.build_detector("darknet", cfg="yolov2-demo", class_names=dcfg.classes, input_size=SIZE)
    fn = functools.partial(evaluate_model, data=val, class_names=dcfg.classes, conf_thres=0.01,
                           gt=kitti_ground_truth(val))
    return Trainer(model, train, val, cfg, run_dir=run_dir, evaluate_fn=fn, device="cpu", seed=1,
                   progress=False, console=False, plots=False, **kw)


def test_pipeline_resume_exact_with_augmentation(tmp_path, data_root):
    cfg = TrainConfig(epochs=2, lr=1e-3, warmup_epochs=0.5, amp=False, best_metric="Car/moderate/R40")
    full = _trainer(tmp_path / "a", data_root, cfg)
    out = full.fit()
    assert "Car/moderate/R40" in out["metrics"] and "mAP/moderate/R40" in out["metrics"]
    assert (tmp_path / "a" / "best.pt").is_file()

    def stop(event, tr):
        if event == "epoch_end" and tr.epoch == 1:
            raise KeyboardInterrupt

    _trainer(tmp_path / "b", data_root, cfg, callbacks=[stop]).fit()
    resumed = _trainer(tmp_path / "b", data_root, cfg, seed=3, resume=tmp_path / "b" / "last.pt")
    resumed.fit()
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
