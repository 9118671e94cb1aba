"""Run folders and interrupts, through tools/train.py and tools/demo.py as a user runs them.

* re-running a name never replaces that run's files: a new ``<name>-2`` folder (unless
  ``exist_ok``); ``--resume`` takes the existing folder and needs it; a run folder that resolves
  outside ``output_dir`` is refused;
* Ctrl-C in a phase stops the whole run (exit status 130) with the phase's ``last.pt`` saved and
  ``results.json`` marked; ``--resume`` continues the right phase, exactly; temporary files a
  killed run left are removed; a Ctrl-C during an evaluation keeps the trained epoch;
* an unknown model family is a one-line error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tinyrun import tiny_config
from toolload import load_tool

from kd_bnn.config import load_config
from kd_bnn.data.synthetic import generate
from kd_bnn.engine.checkpoint import load_checkpoint
from kd_bnn.engine.experiment import RunInterrupted, run_dir_for, run_experiment
from kd_bnn.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STUDENT = """
teacher_train: {epochs: 2, lr: 0.001, eval_interval: 1}
student: {binary: {mode: bwn}}
distill:
  terms: [{loss: mimic_l2, teacher: stride16, student: stride16}]
"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, 4, seed=0, size=(320, 96), val_fraction=0.5)
    return root


def _train(*args: str) -> int:
    return load_tool("train").main([*args, "--no-progress"])


def _interrupt_at(monkeypatch, event: str, phase_dir: str, epoch: int) -> None:
    """Ctrl-C (KeyboardInterrupt) when the trainer of `phase_dir` fires `event` at `epoch`."""
    orig = Trainer._event

    def _event(self, name):
        orig(self, name)
        if name == event and self.run_dir.name == phase_dir and self.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_event", _event)


# --------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------
def test_rerun_with_the_same_name_goes_to_a_new_folder(tmp_path, synth, capsys):
    cfg = tiny_config(tmp_path, synth)
    runs = tmp_path / "runs"
    assert _train(str(cfg)) == 0
    out = capsys.readouterr().out
    assert f"run folder: {runs / 'tiny'}\n" in out
    first = {p.name: p.read_bytes() for p in (runs / "tiny").iterdir() if p.is_file()}
    assert {"last.pt", "best.pt", "metrics.csv", "config.yaml", "results.json"} <= set(first)

    assert _train(str(cfg)) == 0
    out = capsys.readouterr().out
    assert f"run folder: {runs / 'tiny-2'} ({runs / 'tiny'} already exists)" in out
    for name, data in first.items():  # the first run's checkpoints, metrics and config untouched
        assert (runs / "tiny" / name).read_bytes() == data, name
    res = json.loads((runs / "tiny-2" / "results.json").read_text())
    assert res["name"] == "tiny-2" and res["run_dir"] == str(runs / "tiny-2") and res["interrupted"] is False
    assert res["teacher"]["checkpoint"] == str(runs / "tiny-2" / "best.pt")
    assert "name: tiny-2" in (runs / "tiny-2" / "config.yaml").read_text()

    assert _train(str(cfg)) == 0
    assert (runs / "tiny-3" / "last.pt").is_file()
    # the incremented run resumes under its own name (its config records name: tiny-2)
    assert _train(str(cfg), "name=tiny-2", "--resume") == 0
    assert f"run folder: {runs / 'tiny-2'} (resuming)" in capsys.readouterr().out


def test_exist_ok_reuses_the_folder(tmp_path, synth, capsys):
    cfg = tiny_config(tmp_path, synth)
    assert _train(str(cfg)) == 0
    assert _train(str(cfg), "exist_ok=true") == 0
    assert f"run folder: {tmp_path / 'runs' / 'tiny'}\n" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny"]


def test_resume_needs_the_run_folder(tmp_path, synth, capsys):
    rc = _train(str(tiny_config(tmp_path, synth)), "name=nosuch", "--resume")
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"error: cannot resume: run folder {tmp_path / 'runs' / 'nosuch'} does not exist" in err
    assert not (tmp_path / "runs" / "nosuch").exists()


def test_run_folder_outside_output_dir_is_refused(tmp_path, synth, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink(outside, tmp_path / "runs" / "tiny")
    cfg = tiny_config(tmp_path, synth)
    for extra in (["exist_ok=true"], ["--resume"]):
        rc = _train(str(cfg), *extra)
        err = capsys.readouterr().err
        assert rc == 1 and "is not inside output_dir" in err and str(outside) in err, extra
    assert list(outside.iterdir()) == []
    # without exist_ok the symlinked name counts as taken: the run goes to tiny-2
    assert run_dir_for(load_config(cfg)) == tmp_path / "runs" / "tiny-2"
    # names are checked here too, not only by the config's validator
    bad = load_config(cfg).model_copy(update={"name": "../escape"})
    with pytest.raises(ValueError, match="single folder name"):
        run_dir_for(bad)
    assert not (tmp_path / "escape").exists()


def test_demo_rerun_uses_a_new_folder_and_reports_it(tmp_path, synth, capsys):
    (tmp_path / "runs" / "tiny").mkdir(parents=True)  # an earlier demo run
    cfg = tiny_config(tmp_path, synth, STUDENT)
    rc = load_tool("demo").main(["--config", str(cfg), "teacher_train.epochs=1"])
    out = capsys.readouterr().out
    base = tmp_path / "runs" / "tiny-2"
    assert rc == 0 and f"run folder: {base}" in out and f"runs in {base}/" in out
    assert list((tmp_path / "runs" / "tiny").iterdir()) == []
    assert (base / "ablation.txt").is_file() and (base / "student_kd" / "last.pt").is_file()
    res = json.loads((base / "results.json").read_text())
    assert res["interrupted"] is False and res["table"] == str(base / "ablation.txt")


def test_unknown_model_family_is_one_error_line(tmp_path, synth, capsys):
    rc = _train(str(tiny_config(tmp_path, synth)), "teacher.family=nosuch")
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "nosuch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "tiny").exists()  # a run that never started leaves no folder


# --------------------------------------------------------------------------------------------
# interrupts
# --------------------------------------------------------------------------------------------
def _student_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def test_ctrl_c_in_teacher_phase_stops_the_run_and_resume_finishes_it(tmp_path, synth, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, synth, STUDENT)
    runs = tmp_path / "runs"
    assert _train(str(cfg), "name=full") == 0  # the uninterrupted reference
    capsys.readouterr()

    _interrupt_at(monkeypatch, "epoch_end", "teacher", 1)  # Ctrl-C after teacher epoch 1 of 2
    rc = _train(str(cfg))
    err = capsys.readouterr().err
    run = runs / "tiny"
    assert rc == 130
    assert f"interrupted: the teacher phase of run {run} stopped after 1/2 epochs" in err
    assert "name=tiny --resume" in err and "Traceback" not in err
    res = json.loads((run / "results.json").read_text())
    assert res["interrupted"] is True and res["phase"] == "teacher" and res["epoch"] == 1
    assert res["checkpoint"] == str(run / "teacher" / "last.pt") and "student" not in res
    assert load_checkpoint(run / "teacher" / "last.pt")["epoch"] == 1
    assert not (run / "last.pt").exists()  # no student trained from a half-trained teacher
    monkeypatch.undo()

    # what a kill leaves: temporary files of atomic writes; removed on the next start there
    stale = [run / "teacher" / ".last.pt.k1ll3d.tmp", run / ".results.json.x9y8z7.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    assert _train(str(cfg), "--resume") == 0
    out = capsys.readouterr().out
    assert f"run folder: {run} (resuming)" in out and "removed 2 temporary file(s)" in out
    assert not any(p.exists() for p in stale)
    res = json.loads((run / "results.json").read_text())
    assert res["interrupted"] is False and "phase" not in res and res["student"]["checkpoint"]
    assert load_checkpoint(run / "teacher" / "last.pt")["epoch"] == 2
    assert len((run / "teacher" / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    # resumed == uninterrupted, bit for bit: teacher and student
    for sub in ("teacher", ""):
        a, b = _student_weights(runs / "full" / sub), _student_weights(run / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_ctrl_c_in_student_phase_resumes_the_student(tmp_path, synth, capsys, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, synth, STUDENT), ["train.epochs=2"])
    ref = run_experiment(cfg.model_copy(update={"name": "full"}), progress=False)

    _interrupt_at(monkeypatch, "epoch_end", "tiny", 1)  # Ctrl-C after student epoch 1 of 2
    with pytest.raises(RunInterrupted) as exc:
        run_experiment(cfg, progress=False)
    assert exc.value.phase == "student" and exc.value.epoch == 1
    run = tmp_path / "runs" / "tiny"
    res = json.loads((run / "results.json").read_text())
    assert res["interrupted"] is True and res["phase"] == "student" and res["teacher"]["metrics"]
    monkeypatch.undo()
    teacher_before = (run / "teacher" / "last.pt").read_bytes()
    out = run_experiment(cfg, resume=True, progress=False)
    assert out["interrupted"] is False
    assert (run / "teacher" / "last.pt").read_bytes() == teacher_before  # finished: not trained again
    a, b = _student_weights(Path(ref["run_dir"])), _student_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_during_evaluation_keeps_the_epoch(tmp_path, synth, capsys, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, synth), ["train.epochs=2", "train.eval_interval=1"])
    ref = run_experiment(cfg.model_copy(update={"name": "full"}), progress=False)
    calls = {"n": 0}
    orig = Trainer.evaluate

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation after epoch 2
            raise KeyboardInterrupt
        return orig(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, progress=False)
    run = tmp_path / "runs" / "tiny"
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 2 and ck["epoch_complete"] and ck["pending_eval"]["epoch"] == 2  # epoch 2 kept
    monkeypatch.undo()
    out = run_experiment(cfg, resume=True, progress=False)  # evaluates epoch 2, trains nothing more
    assert out["teacher"]["metrics"] == ref["teacher"]["metrics"]
    a, b = load_checkpoint(Path(ref["run_dir"]) / "last.pt"), load_checkpoint(run / "last.pt")
    assert b["pending_eval"] is None and a["best_epoch"] == b["best_epoch"] and a["iteration"] == b["iteration"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


def test_demo_ctrl_c_then_resume_continues_the_phase_in_progress(tmp_path, synth, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, synth, STUDENT)
    demo = load_tool("demo").main
    _interrupt_at(monkeypatch, "epoch_start", "student_kd", 0)  # Ctrl-C as the KD student starts
    assert demo(["--config", str(cfg), "teacher_train.epochs=1"]) == 130
    err = capsys.readouterr().err
    base = tmp_path / "runs" / "tiny"
    assert "interrupted: the student_kd phase" in err and "name=tiny --resume" in err
    res = json.loads((base / "results.json").read_text())
    assert res["interrupted"] is True and res["phase"] == "student_kd" and not (base / "ablation.txt").exists()
    monkeypatch.undo()
    done = {d: (base / d / "last.pt").read_bytes() for d in ("teacher", "student_nokd")}
    assert demo(["--config", str(cfg), "teacher_train.epochs=1", "--resume"]) == 0
    assert f"runs in {base}/" in capsys.readouterr().out
    assert all((base / d / "last.pt").read_bytes() == b for d, b in done.items())  # finished: kept
    assert (base / "ablation.txt").is_file() and json.loads((base / "results.json").read_text())["interrupted"] is False


# --------------------------------------------------------------------------------------------
# exporting what a run wrote
# --------------------------------------------------------------------------------------------
def test_export_refuses_the_teacher_phase_checkpoint_of_a_real_run(tmp_path, synth, capsys):
    """Reproduction (safety issue, 10): exporting runs/<name>/teacher/best.pt as the student
    silently binarized the float teacher. The trainer records ``binary_convs`` in every checkpoint."""
    cfg = tiny_config(tmp_path, synth, STUDENT)
    assert _train(str(cfg)) == 0
    run = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run / "teacher" / "last.pt")["binary_convs"] == 0
    assert load_checkpoint(run / "last.pt")["binary_convs"] > 0
    export = load_tool("export").main
    out = tmp_path / "t.kdbnn"
    assert export(["--config", str(cfg), "--checkpoint", str(run / "teacher" / "last.pt"), "--out", str(out)]) == 2
    assert "holds a float model" in capsys.readouterr().err and not out.exists()
    assert export(["--config", str(cfg), "--checkpoint", str(run / "last.pt"), "--out", str(out)]) == 0


@pytest.mark.parametrize("name", ["../victim", "/abs/victim", "x/../../y", "."])
def test_run_name_that_escapes_output_dir_is_refused_by_the_train_tool(tmp_path, synth, capsys, name):
    """Reproduction (safety issue, 2): ``name=../victim`` wrote outside the runs folder."""
    cfg = tiny_config(tmp_path, synth)
    rc = _train(str(cfg), f"name={name}")
    err = capsys.readouterr().err
    assert rc == 2 and "key 'name'" in err and "single folder name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written anywhere


def test_resume_may_extend_the_schedule(tmp_path, synth, capsys):
    """A longer schedule is the usual reason to resume: train.epochs may grow on --resume (and only
    grow: fewer epochs than are done is refused)."""
    cfg = tiny_config(tmp_path, synth)
    assert _train(str(cfg)) == 0
    run = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert _train(str(cfg), "train.epochs=2", "--resume") == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    capsys.readouterr()
    assert _train(str(cfg), "train.epochs=1", "--resume") != 0
    assert "2 epochs are done, more than the 1 now configured" in capsys.readouterr().err


def test_resume_of_a_run_from_before_a_new_config_key(tmp_path, synth):
    """A key added to the toolkit after a run started (its default keeps the old behaviour) does not
    block resuming that run: the saved config is read through the current schema."""
    cfg = tiny_config(tmp_path, synth, STUDENT)
    assert _train(str(cfg), "train.epochs=2") == 0
    run = tmp_path / "runs" / "tiny"
    state = load_checkpoint(run / "last.pt")
    del state["config"]["student"]["binary"]["keep_pointwise"]  # as a checkpoint written before the key
    torch.save(state, run / "last.pt")
    assert _train(str(cfg), "train.epochs=3", "--resume") == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, synth):
    """`kill` (SIGTERM, also what a job scheduler sends) stops the run after saving what resumes it,
    as Ctrl-C does, instead of losing the epoch in progress; --resume then finishes it."""
    import signal
    import subprocess
    import sys
    import time

    cfg = tiny_config(tmp_path, synth)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), str(cfg), "train.epochs=200", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = tmp_path / "runs" / "tiny" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.is_file(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "--resume" in err
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert results["interrupted"] is True and results["phase"] == "teacher"
    epochs_done = load_checkpoint(last)["epoch"]
    assert 1 <= epochs_done < 200
