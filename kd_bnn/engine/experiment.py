"""Whole experiments from a config: data -> teacher -> binary student -> distillation -> report.

This is what ``tools/train.py`` and ``make demo`` run; every step is also callable on its own
(`build_model`, `build_student` from `kd_bnn.engine.build`, `train_model`, and
`kd_bnn.engine.evaluate.evaluate_model`) so that a notebook can do what the CLI does. The flow
follows Xu et al. (ICRA 2019): a full-precision teacher, a binary-weight copy of it initialised
from its float weights, trained with the detection loss plus feature mimic terms
(`cfg.distill.terms`).

Under ``torchrun`` (``WORLD_SIZE > 1``) `run_experiment` and `run_ablation` initialise the process
group (`kd_bnn.engine.distributed.distributed_session`) and every rank runs the same phases: rank
0 chooses the run folder, generates a synthetic set first, writes every file and evaluates; the
training loaders are sharded (a `DistributedSampler` per phase); every checkpoint a phase loads
(the teacher's best weights, a phase's ``last.pt`` to resume) is read by rank 0 and broadcast.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kd_bnn.binary.convert import apply_stages
from kd_bnn.binary.layers import set_float_weights
from kd_bnn.binary.summary import summary as compression_summary
from kd_bnn.config import ExperimentConfig, TrainConfig, config_to_dict
from kd_bnn.data.loader import build_datasets, build_loader
from kd_bnn.distill import Distiller
from kd_bnn.engine.build import (
    build_model,
    build_student,
    ensure_dataset,
    seed_everything,
)
from kd_bnn.engine.checkpoint import (
    CheckpointError,
    eval_state_dict,
    load_checkpoint,
    training_finished,
    training_progress,
)
from kd_bnn.engine.distributed import (
    barrier,
    decide_on_rank0,
    dist_info,
    distributed_session,
    is_main_process,
)
from kd_bnn.engine.evaluate import evaluate_model, kitti_ground_truth
from kd_bnn.engine.trainer import Trainer
from kd_bnn.io import atomic_write_text
from kd_bnn.models.detector import Detector


class RunInterrupted(KeyboardInterrupt):
    """A training phase of a run stopped before its end (Ctrl-C): the run stops there, with the
    phase's ``last.pt`` saved and ``results.json`` marked ``"interrupted": true``. A
    `KeyboardInterrupt`, so code that does not catch it stops as on any Ctrl-C.

    Attributes: ``run_dir``, ``phase`` ("teacher", "student", ...), ``checkpoint`` (the phase's
    ``last.pt``, None when none was written yet), ``epoch`` (epochs completed) and ``epochs``.
    """

    def __init__(self, run_dir: Path, phase: str, checkpoint: Path | None, epoch: int, epochs: int) -> None:
        self.run_dir, self.phase, self.checkpoint = Path(run_dir), phase, checkpoint
        self.epoch, self.epochs = int(epoch), int(epochs)
        saved = f"saved {checkpoint}" if checkpoint is not None else "no checkpoint written yet"
        super().__init__(f"the {phase} phase of run {self.run_dir} stopped after {self.epoch}/{self.epochs} "
                         f"epochs ({saved})")

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check_run_name(name: str) -> None:
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ValueError(f"name {name!r}: expected a single folder name for <output_dir>/<name>/ "
                         "(no '/' or '\\', not '.' or '..', not empty or absolute)")


def _inside(root: Path, path: Path) -> Path:
    """`path` when it resolves (symlinks followed) to a folder strictly inside `root`."""
    real = path.resolve()
    if real == root or root not in real.parents:
        raise ValueError(f"run folder {path} resolves to {real}, which is not inside output_dir {root}: "
                         "refusing to write there")
    return path


def _choose_run_dir(cfg: ExperimentConfig, resume: bool) -> Path:
    _check_run_name(cfg.name)
    base = Path(cfg.output_dir)
    root = base.resolve()
    first = base / cfg.name
    if resume:
        _inside(root, first)
        if not first.is_dir():
            raise FileNotFoundError(f"cannot resume: run folder {first} does not exist (resume names the "
                                    f"run's folder: name=<a folder in {base}>)")
        return first
    if cfg.exist_ok:
        _inside(root, first).mkdir(parents=True, exist_ok=True)
        return first
    base.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        cand = first if n == 1 else base / f"{cfg.name}-{n}"
        if cand.exists() or cand.is_symlink():
            continue
        try:
            _inside(root, cand).mkdir()  # claims it: two runs started at once never share a folder
        except FileExistsError:
            continue
        return cand
    raise AssertionError("unreachable")  # pragma: no cover


def run_dir_for(cfg: ExperimentConfig, resume: bool = False) -> Path:
    """The folder a run writes: ``<output_dir>/<name>`` (train, demo and ablation all use this).

    * ``resume``: that existing folder (FileNotFoundError naming it when absent);
    * else that folder when it does not exist yet, or when ``exist_ok`` is set (then it is reused
      and its files replaced); otherwise the first free ``<name>-2``, ``<name>-3``, ... (as
      Ultralytics' ``increment_path``): an earlier run is never overwritten. A new folder is
      created here.

    Raises:
        ValueError: ``name`` is not a single folder name, or the folder resolves (through a
            symlink) outside ``output_dir``.

    Under DDP rank 0 chooses and the other ranks get its choice (or its error).
    """
    return decide_on_rank0(lambda: _choose_run_dir(cfg, resume), errors=(FileNotFoundError, ValueError))


_STALE_TMP = re.compile(r"^\..+\.tmp$")


def clean_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp``, `kd_bnn.io.atomic_path`) that a killed
    run left in `run_dir` and its sub-folders (symlinked folders are not entered); returns them."""
    removed: list[Path] = []
    for dirpath, _, files in os.walk(run_dir, followlinks=False):
        for f in files:
            p = Path(dirpath) / f
            if _STALE_TMP.match(f) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@dataclass
class RunResult:
    """What one training run produced."""

    run_dir: Path
    best_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "completed"
    best_epoch: int | None = None  # the epoch ``best_checkpoint`` holds, when it was evaluated
    epochs: int = 0
    epochs_done: int = 0
    iterations_per_epoch: int = 0  # per rank under DDP
    world_size: int = 1
    last_checkpoint: Path | None = None
    best_metric: float | None = None  # the value of ``metric_name`` at ``best_epoch``
    metric_name: str = ""  # ``train.best_metric``

    def best_is_last_evaluation(self) -> bool:
        """True when ``metrics`` (the last evaluation) are those of ``best_checkpoint``."""
        return bool(self.metrics) and self.status == "completed" and self.best_epoch == self.epochs


#: Config keys a resumed run may change: a longer schedule is the usual reason to resume (the LR
#: schedule then spans the new length, so the rate rises again from where it was); exist_ok only
#: chose the folder.
RESUME_MAY_CHANGE = ("exist_ok", "train.epochs", "teacher_train.epochs")


def train_model(model: Detector, cfg: ExperimentConfig, train_cfg: TrainConfig, run_dir: Path,
                teacher: Detector | None = None, resume: str | os.PathLike | None = None,
                progress: bool | None = None, loaders=None) -> RunResult:
    """Train `model` (distilling from `teacher` when given and ``distill`` is enabled).

    ``best_checkpoint`` is this training's ``best.pt`` (a stale one from an earlier run in a
    reused folder is never reported), else its ``last.pt``."""
    rank, world = dist_info()
    train_ds, val_ds = build_datasets(cfg.data) if loaders is None else (None, None)
    if loaders is None:
        # DDP: each rank trains on its shard; rank 0 alone evaluates, on the whole val split
        train_loader = build_loader(train_ds, cfg.data.batch_size, shuffle=True, workers=cfg.data.workers,
                                    seed=cfg.seed, distributed=world > 1)
        val_loader = build_loader(val_ds, cfg.data.batch_size, shuffle=False, workers=cfg.data.workers,
                                  seed=cfg.seed)
    else:
        train_loader, val_loader = loaders
    distiller = None
    if teacher is not None and cfg.distill.enabled and cfg.distill.terms:
        distiller = Distiller(teacher, model, cfg.distill.terms)
    evaluate_fn = functools.partial(evaluate_model, data=val_loader, class_names=list(model.class_names),
                                    conf_thres=cfg.eval.conf_thres, iou_thres=cfg.eval.iou_thres,
                                    max_det=cfg.eval.max_det, gt=kitti_ground_truth(val_loader) if rank == 0 else {})
    trainer = Trainer(model, train_loader, val_loader, train_cfg, run_dir, distiller=distiller,
                      binary_policy=cfg.student.binary if (teacher is not None and cfg.student) else None,
                      evaluate_fn=evaluate_fn, device=cfg.device, config_dict=config_to_dict(cfg),
                      seed=cfg.seed, progress=progress, resume=resume, resume_ignore=RESUME_MAY_CHANGE)
    try:
        out = trainer.fit()
    finally:
        if distiller is not None:
            distiller.remove_taps()
        trainer.close()
    find = functools.partial(_checkpoints_of, Path(run_dir), out.get("best_epoch") is not None)
    # rank 0 wrote them; an interrupted run makes no collective call (other ranks may be anywhere)
    best, last = decide_on_rank0(find) if out.get("status") == "completed" else find()
    return RunResult(Path(run_dir), best, dict(out.get("metrics") or {}),
                     out.get("status", "completed"), out.get("best_epoch"), int(train_cfg.epochs),
                     int(out.get("epoch", 0)), int(out.get("iterations_per_epoch", 0)),
                     int(out.get("world_size", world)), last, out.get("best_metric"),
                     train_cfg.best_metric)


def _checkpoints_of(run_dir: Path, evaluated: bool) -> tuple[Path | None, Path | None]:
    """(best checkpoint: ``best.pt`` of this training, else ``last.pt``; ``last.pt``), None when absent."""
    last = run_dir / "last.pt"
    last = last if last.is_file() else None
    best = run_dir / "best.pt"
    return (best if evaluated and best.is_file() else last), last


def _load_weights(path: Path) -> dict[str, Any]:
    """The weights to use of a checkpoint (`eval_state_dict`), read on rank 0 and given to every
    rank (the other nodes of a multi-node run need not see rank 0's run folder)."""
    return decide_on_rank0(lambda: eval_state_dict(load_checkpoint(path)), errors=(CheckpointError,))


def _phase_results(res: RunResult) -> dict[str, Any]:
    """What ``results.json`` records of a trained phase."""
    return {"checkpoint": str(res.best_checkpoint), "metrics": res.metrics, "best_epoch": res.best_epoch,
            "best_metric": res.best_metric, "best_metric_name": res.metric_name, "epochs": res.epochs,
            "iterations_per_epoch": res.iterations_per_epoch,
            "last_checkpoint": None if res.last_checkpoint is None else str(res.last_checkpoint)}


def model_size(model: nn.Module, input_size: tuple[int, int]) -> dict[str, float]:
    """Parameters, float32 MB, packed MB and compression (the `.kdbnn` accounting)."""
    s = compression_summary(model, tuple(input_size), print_fn=lambda *_: None)
    t = s["totals"]
    return {"params": float(sum(p.numel() for p in model.parameters())),
            "float32_mb": t["float32_bytes"] / 2**20, "packed_mb": t["packed_bytes"] / 2**20,
            "compression": t["compression"], "binary_mac_fraction": t.get("binary_mac_fraction", 0.0)}


class _Run:
    """The phases of one run in its folder, in order, and what happens when one stops early.

    Resume: the first phase whose ``last.pt`` is not a finished training continues from it (or
    starts, when it has none); finished phases before it are only reloaded; every phase after it
    starts from scratch (its inputs, e.g. the teacher, have changed).
    """

    def __init__(self, run_dir: Path, results: dict[str, Any], resume: bool, fresh_dir: bool) -> None:
        self.run_dir, self.results, self.resume, self.fresh_dir = run_dir, results, resume, fresh_dir
        self.restart = not resume
        self.phase: str | None = None
        self.phase_dir = run_dir
        self.epochs = 0

    def start(self, phase: str, phase_dir: Path, epochs: int) -> Path | None:
        """Enter `phase` (trained in `phase_dir` for `epochs` epochs); the checkpoint it resumes."""
        self.phase, self.phase_dir, self.epochs = phase, Path(phase_dir), int(epochs)
        if self.restart:
            return None
        last = self.phase_dir / "last.pt"
        finished, exists = decide_on_rank0(lambda: (training_finished(last, epochs), last.is_file()),
                                           errors=(CheckpointError,))
        if finished:
            return last  # finished: reloaded (fit has nothing left to do)
        self.restart = True
        return last if exists else None

    def check(self, res: RunResult) -> None:
        if res.status != "completed":
            raise KeyboardInterrupt  # e.g. "interrupted": the trainer saved last.pt and returned

    def write_results(self) -> None:
        if is_main_process():
            atomic_write_text(self.run_dir / "results.json", json.dumps(self.results, indent=2, default=str))

    def stopped(self, exc: BaseException) -> None:
        """Called with whatever ended the run early: a Ctrl-C inside a phase becomes
        `RunInterrupted` after marking ``results.json``; a run folder this call created and left
        empty is removed; everything else propagates unchanged."""
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted) and self.phase:
            last = self.phase_dir / "last.pt"
            progress = None
            try:
                progress = training_progress(last)
            except Exception:  # noqa: BLE001 - an unreadable checkpoint: reported as absent
                progress = None
            epoch = progress["epoch"] if progress else 0
            self.results.update(interrupted=True, phase=self.phase, epoch=epoch, epochs=self.epochs,
                                checkpoint=str(last) if progress else None)
            self.write_results()
            raise RunInterrupted(self.run_dir, self.phase, last if progress else None, epoch, self.epochs) from None
        if (self.fresh_dir and dist_info()[0] == 0 and self.run_dir.is_dir()
                and not any(self.run_dir.iterdir())):
            self.run_dir.rmdir()  # nothing was written: the name stays free


def _open_run(cfg: ExperimentConfig, resume: bool, run_dir: str | os.PathLike | None
              ) -> tuple[ExperimentConfig, Path, bool]:
    """Choose (or take) the run folder, report it, clean what a killed run left there. Returns
    the config with ``name`` = the folder's name (what config.yaml records and a later
    ``--resume`` names), the folder, and whether it is new (empty, not resumed)."""
    asked = Path(cfg.output_dir) / cfg.name
    run_dir = run_dir_for(cfg, resume) if run_dir is None else Path(run_dir)
    if run_dir.name != cfg.name:
        cfg = cfg.model_copy(update={"name": run_dir.name})
    if dist_info()[0] == 0:
        note = (" (resuming)" if resume else
                f" ({asked} already exists)" if run_dir != asked else "")
        print(f"run folder: {run_dir}{note}", flush=True)
        removed = clean_stale_tmp(run_dir)
        if removed:
            print(f"removed {len(removed)} temporary file(s) a stopped run left in {run_dir}", flush=True)
    fresh = not resume and run_dir.is_dir() and not any(run_dir.iterdir())
    return cfg, run_dir, fresh


def _ensure_dataset_in_turn(cfg: ExperimentConfig) -> None:
    """`ensure_dataset` under DDP: rank 0 first (it generates a synthetic set when asked for; its
    errors are raised on every rank), then the first rank of each node (which finds that set, or
    generates its own copy on a node that does not share rank 0's file system), then the rest."""
    rank, world = dist_info()
    if world <= 1:
        ensure_dataset(cfg.data)
        return
    barrier()  # every rank is done reading the data folder (e.g. its preflight) before rank 0 writes there
    decide_on_rank0(lambda: ensure_dataset(cfg.data), errors=(FileNotFoundError, ValueError, OSError))
    local = int(os.environ.get("LOCAL_RANK", rank))
    for turn in (1, 2):
        if rank != 0 and turn == (1 if local == 0 else 2):
            ensure_dataset(cfg.data)
        barrier()


def _build_teacher(cfg: ExperimentConfig) -> Detector:
    """The teacher a run starts from: seeded with ``cfg.seed``, after making sure of the dataset
    (the synthetic set is generated first when asked for), with ``teacher.weights`` if any."""
    _ensure_dataset_in_turn(cfg)
    seed_everything(cfg.seed)
    return build_model(cfg.teacher, list(cfg.data.classes), tuple(cfg.data.input_size))


def _prepare_teacher(teacher: Detector, cfg: ExperimentConfig, run: _Run,
                     progress: bool | None) -> RunResult | None:
    """Make `teacher` the one the students learn from: when ``teacher_train`` is set, train it in
    ``<run>/teacher`` (or resume / reload that phase) and load its best weights; then eval mode,
    and reseed so that a student starts alike whether or not the teacher trained now. Returns
    the teacher's training result (None when it was not trained here)."""
    tres = None
    if cfg.teacher_train is not None:
        tdir = run.run_dir / "teacher"
        ckpt = run.start("teacher", tdir, cfg.teacher_train.epochs)
        tres = train_model(teacher, cfg, cfg.teacher_train, tdir, progress=progress, resume=ckpt)
        run.check(tres)
        if tres.best_checkpoint is not None:
            teacher.load_state_dict(_load_weights(tres.best_checkpoint))
    teacher.eval()
    seed_everything(cfg.seed)
    return tres


def _train_student(student: Detector, teacher: Detector, cfg: ExperimentConfig, run: _Run, phase: str,
                   phase_dir: Path, progress: bool | None) -> RunResult:
    """Train `student` in `phase_dir` as phase `phase`. With ``stage1_train`` (two-stage training,
    ReActNet, Liu et al. 2020) it first trains with float weights and binary activations in
    ``<phase_dir>/stage1`` (phase ``<phase>_stage1``), and the binary-weight training starts from
    that phase's best weights."""
    if cfg.stage1_train is not None:
        set_float_weights(student, True)
        ckpt = run.start(f"{phase}_stage1", phase_dir / "stage1", cfg.stage1_train.epochs)
        r1 = train_model(student, cfg, cfg.stage1_train, phase_dir / "stage1", teacher=teacher, resume=ckpt,
                         progress=progress)
        run.check(r1)
        if r1.best_checkpoint is not None:
            student.load_state_dict(_load_weights(r1.best_checkpoint))
        set_float_weights(student, False)
        run.results[f"{phase}_stage1"] = _phase_results(r1)
        seed_everything(cfg.seed)
    ckpt = run.start(phase, phase_dir, cfg.train.epochs)
    res = train_model(student, cfg, cfg.train, phase_dir, teacher=teacher, resume=ckpt, progress=progress)
    run.check(res)
    return res


def run_experiment(cfg: ExperimentConfig, resume: bool | str | os.PathLike | None = False,
                   progress: bool | None = None, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a whole config: optionally train the teacher, then train the binary student.

    Layout: ``<output_dir>/<name>/`` (chosen by `run_dir_for`: a new ``<name>-2`` ... when that
    folder exists, unless ``exist_ok``; or `run_dir`) for the trained model, ``teacher/`` beneath
    it when the teacher is trained first. Returns a JSON-able summary, also written to
    ``results.json``.

    `resume` (True; a path is accepted as before and means the same) continues the run in the
    existing ``<output_dir>/<name>/``: an unfinished teacher phase is resumed and the student
    then trained from scratch; with the teacher finished the student is resumed (or started).

    Under torchrun (``WORLD_SIZE > 1``) the process group is initialised here unless it already
    is (`distributed_session`); ``results.json`` records ``world_size`` and each phase's
    ``iterations_per_epoch`` (per rank).

    Raises:
        RunInterrupted: a phase stopped early (Ctrl-C); its ``last.pt`` is saved and
            ``results.json`` says ``"interrupted": true`` and which ``"phase"``.
    """
    with distributed_session(cfg.device):
        return _run_experiment(cfg, bool(resume), progress, run_dir)


def _run_experiment(cfg: ExperimentConfig, resume: bool, progress: bool | None,
                    run_dir: str | os.PathLike | None) -> dict[str, Any]:
    if resume and run_dir is None:
        run_dir = run_dir_for(cfg, resume=True)  # a missing run folder fails at once
    teacher = _build_teacher(cfg)  # bad input fails here, before a folder is made
    size = tuple(cfg.data.input_size)
    cfg, run_dir, fresh_dir = _open_run(cfg, resume, run_dir)
    results: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir), "world_size": dist_info()[1]}
    run = _Run(run_dir, results, resume, fresh_dir)
    try:
        if cfg.student is None:  # teacher-only run
            ckpt = run.start("teacher", run_dir, cfg.train.epochs)
            res = train_model(teacher, cfg, cfg.train, run_dir, resume=ckpt, progress=progress)
            run.check(res)
            results["teacher"] = {**_phase_results(res), **model_size(teacher, size)}
        else:
            tres = _prepare_teacher(teacher, cfg, run, progress)
            if tres is not None:
                results["teacher"] = _phase_results(tres)
            student, report = build_student(teacher, cfg)
            if is_main_process():
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "binarize_report.txt", report.table())
            sres = _train_student(student, teacher, cfg, run, "student", run_dir, progress)
            reusable = False
            if sres.best_checkpoint is not None:
                student.load_state_dict(_load_weights(sres.best_checkpoint))
                reusable = _metrics_of_final_student(sres, student, cfg)
            results["student"] = {**_phase_results(sres),
                                   "metrics_of_checkpoint": reusable,
                                   "distilled": bool(cfg.distill.enabled and cfg.distill.terms),
                                   **model_size(student, size)}
            results.setdefault("teacher", {}).update(model_size(teacher, size))
    except BaseException as exc:
        run.stopped(exc)
        raise
    results["interrupted"] = False
    run.write_results()
    return results


ABLATION_CLASSES = ("Car", "Pedestrian", "Cyclist")


def _ap(metrics: dict[str, Any], key: str) -> str:
    v = metrics.get(key)
    return "n/a" if not isinstance(v, (int, float)) or v != v else f"{float(v):.2f}"


def format_run_summary(results: dict[str, Any], metric: str = "moderate/R40") -> str:
    """The few lines ``tools/train.py`` ends with: the run folder, each trained phase (epochs,
    best epoch, the AP of ``<class>/moderate/R40`` of its last evaluation for Car, Pedestrian and
    Cyclist, or the classes it has; its checkpoints), iterations per epoch per rank under DDP,
    and where ``results.json`` is. The whole record is ``results.json`` (``--json`` prints it)."""
    run_dir = Path(str(results.get("run_dir", ".")))
    world = int(results.get("world_size", 1) or 1)
    lines = [f"run folder: {run_dir}" + (f" (world size {world})" if world > 1 else "")]
    for phase, res in results.items():
        if not isinstance(res, dict) or "checkpoint" not in res or "metrics" not in res:
            continue
        metrics = res.get("metrics") or {}
        classes = [c for c in ABLATION_CLASSES if f"{c}/{metric}" in metrics] or [
            k[: -len(metric) - 1] for k in metrics if k.endswith("/" + metric) and not k.startswith("mAP/")]
        label = phase + (" (distilled)" if res.get("distilled") else "")
        head = f"{label}: {res.get('epochs', '?')} epoch(s)"
        if res.get("best_epoch") is not None:
            best = res.get("best_metric")
            name = res.get("best_metric_name") or "best metric"
            head += f", best epoch {res['best_epoch']}"
            if isinstance(best, (int, float)):
                head += f" ({name} {best:.2f})"
        if world > 1 and res.get("iterations_per_epoch"):
            head += f", {res['iterations_per_epoch']} it/epoch per rank"
        lines.append(head)
        if classes:
            aps = "  ".join(f"{c} {_ap(metrics, f'{c}/{metric}')}" for c in classes)
            diff, kind = metric.split("/")
            lines.append(f"  AP_{kind} {diff}, epoch {res.get('epochs', '?')}: {aps}")
        ckpts = [f"{res['checkpoint']}"]
        if res.get("last_checkpoint") and res["last_checkpoint"] != res["checkpoint"]:
            ckpts.append(f"{res['last_checkpoint']} (resume)")
        lines.append(f"  checkpoints: {', '.join(ckpts)}")
    if results.get("interrupted"):
        lines.append(f"interrupted in the {results.get('phase')} phase")
    lines.append(f"results: {run_dir / 'results.json'}")
    return "\n".join(lines)


def _metrics_of_final_student(res: RunResult, student: Detector, cfg: ExperimentConfig) -> bool:
    """Whether ``res.metrics`` evaluate the state now loaded in `student` with every binary layer
    on: the best checkpoint is the last evaluated epoch and no binarization stage starts after
    it. Leaves every stage enabled (the deployed student)."""
    at_last = len(apply_stages(student, cfg.student.binary, cfg.train.epochs - 1))
    return res.best_is_last_evaluation() and at_last == len(apply_stages(student, cfg.student.binary, 10**9))


def run_ablation(cfg: ExperimentConfig, progress: bool | None = None, resume: bool = False,
                 run_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The paper's ablation on one config: teacher, binary student without and with knowledge
    transfer, each evaluated on the validation split (Xu et al., ICRA 2019, Table I style).

    The teacher is trained first when ``teacher_train`` is set (into ``<run>/teacher``); both
    students start from the same teacher weights and train with the same budget (``train``), so
    the only difference between them is the distillation terms. The run folder is chosen like
    `run_experiment`'s (`run_dir_for`: a re-run goes to ``<name>-2`` ...; or `run_dir`), and
    `resume` continues an interrupted ablation there (phases teacher, student_nokd, student_kd).

    Raises:
        RunInterrupted: a phase stopped early (Ctrl-C); ``results.json`` in the run folder says
            ``"interrupted": true`` and which ``"phase"``.
    """
    if cfg.student is None:
        raise ValueError("run_ablation needs a 'student' section in the config")
    with distributed_session(cfg.device):
        return _run_ablation(cfg, progress, resume, run_dir)


def _run_ablation(cfg: ExperimentConfig, progress: bool | None, resume: bool,
                  run_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    cfg, base, fresh_dir = _open_run(cfg, resume, run_dir)  # draws no random numbers: seeding comes after
    results: dict[str, Any] = {"name": cfg.name, "run_dir": str(base), "world_size": dist_info()[1]}
    run = _Run(base, results, resume, fresh_dir)
    try:
        teacher = _build_teacher(cfg)  # in the try: bad input removes a run folder left empty
        tres = _prepare_teacher(teacher, cfg, run, progress)
        if tres is not None:
            results["teacher"] = _phase_results(tres)
        reuse = tres.metrics if tres is not None and tres.best_is_last_evaluation() else None
        rows = [_ablation_row("teacher (float32)", teacher, cfg, reuse)]
        mode = cfg.student.binary.mode.upper()
        for label, kd in ((f"student {mode}, no KD", False), (f"student {mode} + KD", True)):
            scfg = cfg.model_copy(deep=True)
            scfg.distill.enabled = kd and bool(cfg.distill.terms)
            seed_everything(cfg.seed)
            student, _ = build_student(teacher, scfg)
            phase = "student_kd" if kd else "student_nokd"
            res = _train_student(student, teacher, scfg, run, phase, base / phase, progress)
            student.load_state_dict(_load_weights(res.best_checkpoint))
            results[phase] = _phase_results(res)
            rows.append(_ablation_row(label, student, scfg,
                                      res.metrics if _metrics_of_final_student(res, student, scfg) else None))
    except BaseException as exc:
        run.stopped(exc)
        raise
    if is_main_process():
        atomic_write_text(base / "ablation.json", json.dumps(rows, indent=2, default=str))
        atomic_write_text(base / "ablation.txt", format_ablation(rows))
    results.update(interrupted=False, table=str(base / "ablation.txt"))
    run.write_results()
    return rows


def _ablation_row(label: str, model: Detector, cfg: ExperimentConfig,
                  metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """A table row; `metrics` are the trainer's final evaluation of this very state when it has
    one (same val split and thresholds), else the model is evaluated here."""
    if metrics is None:  # rank 0 evaluates (its device), every rank gets the metrics
        metrics = decide_on_rank0(lambda: evaluate_model(model, cfg)[0])
    row: dict[str, Any] = {"model": label, **model_size(model, tuple(cfg.data.input_size))}
    row["ap_r40"] = {c: {d: metrics.get(f"{c}/{d}/R40", float("nan")) for d in ("easy", "moderate", "hard")}
                     for c in cfg.data.classes}
    return row


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """One text table: model, params, float32 MB, packed MB, compression, AP_R40 E/M/H per class."""
    classes = list(rows[0]["ap_r40"]) if rows else []
    head = f"{'model':<22}{'params':>9}{'fp32 MB':>9}{'packed MB':>10}{'ratio':>7}"
    for c in classes:
        head += f"  {c + ' AP_R40 E/M/H':>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['model']:<22}{r['params'] / 1e6:>8.2f}M{r['float32_mb']:>9.2f}{r['packed_mb']:>10.3f}"
                f"{r['compression']:>6.1f}x")
        for c in classes:
            ap = r["ap_r40"][c]
            line += f"  {ap['easy']:>8.2f}/{ap['moderate']:>6.2f}/{ap['hard']:>6.2f}    "
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"
