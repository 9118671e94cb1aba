"""DDP through the real path: ``torchrun --standalone --nproc_per_node 2 tools/train.py CONFIG`` on
CPU (gloo), as a user launches it.

* one run folder, written by rank 0 only, one summary printed;
* the teacher phase and the distilled student phase each train one model: every rank ends
  with the weights rank 0 saved (teacher, student, EMA);
* the training set is sharded: per-rank iterations = ceil(N / (2 * batch)); ``results.json``
  records ``world_size: 2`` and each phase's ``iterations_per_epoch``;
* rank 0 alone evaluates, on the whole val split: the metrics of a single-process evaluation of
  the same weights;
* a run stopped (Ctrl-C on every rank) and resumed under DDP ends with the weights of the
  uninterrupted run.

Each rank's final weights come from a probe: a launcher script that wraps ``Trainer.fit`` to dump
them, then runs tools/train.py as ``__main__``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinyrun import REPO

from kd_bnn.config import load_config
from kd_bnn.data.synthetic import generate
from kd_bnn.engine.checkpoint import load_checkpoint

N_TRAIN, BATCH, WORLD = 8, 2, 2

PROBE = r'''
import os, runpy, sys
from pathlib import Path
import torch
from kd_bnn.engine import trainer as T

out = Path(os.environ["PROBE_OUT"])
stop = os.environ.get("PROBE_STOP")  # "<run dir name>:<epoch>": Ctrl-C on every rank there
fit = T.Trainer.fit
event = T.Trainer._event

def _fit(self):
    res = fit(self)
    dump = {"model": self.model.state_dict(), "eval": self.eval_model().state_dict(),
            "teacher": self.distiller.teacher.state_dict() if self.distiller is not None else {},
            "iterations_per_epoch": self.iters_per_epoch, "iteration": self.iteration,
            "status": res["status"]}
    torch.save(dump, out / f"{self.run_dir.name}.rank{self.rank}.pt")
    return res

def _event(self, name):
    event(self, name)
    if stop and name == "epoch_end" and f"{self.run_dir.name}:{self.epoch}" == stop:
        raise KeyboardInterrupt

from kd_bnn.engine import evaluate as E
predict = E.iter_kitti_predictions

def _predict(*args, **kwargs):  # which rank evaluates, on how many frames
    frames = list(predict(*args, **kwargs))
    with open(out / f"eval.rank{os.environ['RANK']}.txt", "a") as fh:
        fh.write(f"{len(frames)}\n")
    yield from frames

T.Trainer.fit, T.Trainer._event, E.iter_kitti_predictions = _fit, _event, _predict
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = base / "synth"
    generate(root, 2 * N_TRAIN, seed=0, size=(320, 96), val_fraction=0.5)  # 8 train, 8 val frames
    cfg = base / "c.yaml"
    cfg.write_text(f"""
name: ddp
device: cpu
output_dir: {base / 'runs'}
data: {{root: {root}, input_size: [64, 192], batch_size: {BATCH}, workers: 0}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
teacher_train: {{epochs: 1, lr: 0.001}}
student: {{binary: {{mode: bwn}}}}
distill:
  terms: [{{loss: mimic_l2, teacher: stride16, student: stride16}}]
train: {{epochs: 2, lr: 0.001, ema: true, ema_decay: 0.9, sync_bn: true}}
""")
    probe = base / "probe.py"
    probe.write_text(PROBE)
    return base, cfg, probe


def _torchrun(setup, out: Path, *args: str, stop: str | None = None) -> subprocess.CompletedProcess:
    base, cfg, probe = setup
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_OUT": str(out), "PYTHONPATH": str(REPO)}
    env.pop("PROBE_STOP", None)
    if stop:
        env["PROBE_STOP"] = stop
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(probe), str(REPO / "tools" / "train.py"), str(cfg), *args, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.fixture(scope="module")
def full_run(setup):
    base = setup[0]
    proc = _torchrun(setup, base / "dump_full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_torchrun_two_processes_train_one_sharded_model(setup, full_run):
    base = setup[0]
    runs, dumps = base / "runs", base / "dump_full"
    run = runs / "ddp"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp"]  # one folder: rank 0 chose it for both
    out = full_run.stdout
    assert out.count("run folder: ") == 2 and out.count(f"results: {run / 'results.json'}") == 1, out
    assert f"run folder: {run} (world size 2)" in out
    assert "AP_R40 moderate, epoch 2: Car " in out and "{" not in out  # the summary, not the JSON

    res = json.loads((run / "results.json").read_text())
    per_rank = math.ceil(N_TRAIN / (WORLD * BATCH))
    assert res["world_size"] == WORLD
    assert res["teacher"]["iterations_per_epoch"] == res["student"]["iterations_per_epoch"] == per_rank
    assert res["student"]["checkpoint"] == str(run / "best.pt")
    assert res["student"]["last_checkpoint"] == str(run / "last.pt")

    for phase, folder in (("teacher", run / "teacher"), ("ddp", run)):
        r0 = torch.load(dumps / f"{phase}.rank0.pt", weights_only=True)
        r1 = torch.load(dumps / f"{phase}.rank1.pt", weights_only=True)
        assert r0["iterations_per_epoch"] == r1["iterations_per_epoch"] == per_rank
        for key in ("model", "eval", "teacher"):
            _equal(r0[key], r1[key], f"{phase} {key} rank 0 vs rank 1")
        last = load_checkpoint(folder / "last.pt")
        _equal(last["model"], r1["model"], f"{phase} last.pt vs rank 1")
        assert last["world_size"] == WORLD and len(last["rng_ranks"]) == WORLD
        assert not list(folder.glob("*rank*"))  # nothing per-rank in the run folder
    # the student distilled from the teacher phase's weights, on every rank
    t1 = torch.load(dumps / "ddp.rank1.pt", weights_only=True)["teacher"]
    _equal(load_checkpoint(run / "teacher" / "best.pt")["model"], t1, "teacher best.pt vs rank 1's teacher")
    # best.pt: the EMA weights that were evaluated, the config and metrics, nothing to resume with
    best = load_checkpoint(run / "best.pt")
    assert not {"optimizer", "rng", "rng_ranks", "scheduler", "ema", "adapters"} & set(best)
    assert best["weights"] == "ema" and best["epoch"] == best["best_epoch"] == res["student"]["best_epoch"]
    assert best["model"].keys() == torch.load(dumps / "ddp.rank1.pt", weights_only=True)["eval"].keys()


def test_rank0_evaluation_equals_a_single_process_evaluation(setup, full_run):
    from kd_bnn.engine.build import load_student
    from kd_bnn.engine.evaluate import evaluate_model

    base, cfg_path, _ = setup
    run = base / "runs" / "ddp"
    res = json.loads((run / "results.json").read_text())
    cfg = load_config(cfg_path)
    last = load_checkpoint(run / "last.pt")
    student = load_student(cfg, run / "last.pt")  # the EMA weights of the last epoch, evaluated there
    metrics, _ = evaluate_model(student, cfg)
    assert metrics == res["student"]["metrics"] == last["metrics"]
    # rank 0 alone evaluated, every time on the whole val split (8 frames): teacher 1, student 2 epochs
    dumps = base / "dump_full"
    assert (dumps / "eval.rank0.txt").read_text().split() == ["8", "8", "8"]
    assert not (dumps / "eval.rank1.txt").exists()


@pytest.mark.slow  # two more launches (~30 s)
def test_resume_under_ddp_continues_exactly(setup, full_run):
    base, cfg, _ = setup
    stopped = _torchrun(setup, base / "dump_stop", "name=ddp_r", stop="ddp_r:1")
    assert stopped.returncode != 0
    run = base / "runs" / "ddp_r"
    assert json.loads((run / "results.json").read_text())["interrupted"] is True
    resumed = _torchrun(setup, base / "dump_resume", "name=ddp_r", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    full = torch.load(base / "dump_full" / "ddp.rank1.pt", weights_only=True)
    for rank in range(WORLD):
        again = torch.load(base / "dump_resume" / f"ddp_r.rank{rank}.pt", weights_only=True)
        assert again["iteration"] == full["iteration"]
        _equal(again["model"], full["model"], f"resumed rank {rank} vs uninterrupted")
        _equal(again["eval"], full["eval"], f"resumed rank {rank} EMA vs uninterrupted")
    res = json.loads((run / "results.json").read_text())
    assert res["interrupted"] is False and res["world_size"] == WORLD
