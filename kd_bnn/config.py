"""Typed experiment configuration: YAML with ``base:`` inheritance and ``a.b=c`` overrides.

Every section is a pydantic model with ``extra='forbid'``, so a misspelt key is an error that
lists the valid keys (torchdistill-style declarative experiments, Ultralytics-style overrides).
Numbers are range-checked here, before any work starts (``train.epochs >= 1``, ``train.lr > 0``,
probabilities in [0, 1], ...; NaN and infinity are refused everywhere), and ``name`` must be a
single folder name, since a run writes ``<output_dir>/<name>/``.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path, PureWindowsPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override that is not valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# Value ranges (pydantic constraints: the error names the bound, `validate` the key and the value)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class SyntheticConfig(_Section):
    num: PositiveInt = 400
    seed: NonNegativeInt = 0
    size: tuple[PositiveInt, PositiveInt] = (1242, 375)  # width, height of generated images
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25


class AugmentConfig(_Section):
    hflip: Probability = 0.5
    hsv: NonNegativeFloat = 0.2  # colour jitter strength (brightness/contrast/saturation)
    scale: tuple[PositiveFloat, PositiveFloat] = (0.8, 1.2)  # (lo, hi), lo <= hi
    crop: Probability = 0.5  # probability of a random crop that keeps boxes valid

    @field_validator("scale")
    @classmethod
    def _scale_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError("expected a range (lo, hi) with lo <= hi")
        return v


class DataConfig(_Section):
    root: str = "data/synthetic"
    synthetic: SyntheticConfig | None = None  # generate into `root` when it is absent
    train_split: str = "train"  # name in <root>/ImageSets or a path to an id list
    val_split: str = "val"
    classes: list[str] = Field(default_factory=lambda: ["Car", "Pedestrian", "Cyclist"], min_length=1)
    merge: dict[str, str] = Field(default_factory=dict)  # e.g. {"Van": "Car"}
    input_size: tuple[PositiveInt, PositiveInt] = (384, 1248)  # height, width (the model checks its stride)
    batch_size: PositiveInt = 8
    workers: NonNegativeInt = 0
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    max_images: PositiveInt | None = None  # cap the split (quick experiments)
    cache_images: bool = False  # keep decoded images in memory (small sets, workers=0)


class ModelConfig(_Section):
    family: str = "darknet"  # registered detector family: darknet | mobilenet_yolo | ultralytics | ...
    cfg: str | None = None  # Darknet .cfg / Ultralytics .yaml
    weights: str | None = None  # Darknet .weights / Ultralytics .pt / kd_bnn checkpoint
    trust: bool = False  # allow unpickling a third-party checkpoint (Ultralytics .pt)
    options: dict[str, Any] = Field(default_factory=dict)  # family-specific keyword arguments
    # A model trained on other classes (README, "Bring your own COCO model"; kd_bnn.models.classmap):
    names: str | None = None  # the model's own class names: a file, one class per line (Darknet coco.names); default: those the model carries (Ultralytics .pt)
    class_map: dict[str, str] | None = None  # model class -> data class, e.g. {car: Car, person: Pedestrian, bicycle: Cyclist}; unmapped model classes are ignored
    reset_head: bool = False  # resize the prediction layers to data.classes (rows from class_map, else same-named classes) to fine-tune; without it a class_map wraps the model as it is

    @field_validator("class_map")
    @classmethod
    def _class_map_names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if not v:
                raise ValueError("expected at least one 'model class: data class' pair, e.g. {car: Car}")
            blank = [f"{a!r}: {b!r}" for a, b in v.items() if not a.strip() or not b.strip()]
            if blank:
                raise ValueError(f"class names must not be blank: {', '.join(blank)}")
        return v


class StageConfig(_Section):
    layers: list[str]  # module-path globs or 're:' regexes
    epoch: NonNegativeInt = 0


class BlockConfig(_Section):
    """Binary block options (kd_bnn.binary.blocks): applied to every converted conv of a conv->bn->act block."""

    shortcut: bool = False  # real-valued parameter-free shortcut around the binary conv, BN before the add
    rsign: bool = False  # learnable per-channel threshold before the activation sign (xnor only)
    rprelu: bool = False  # the block's activation becomes RPReLU, initialised from it


class BinaryConfig(_Section):
    mode: Literal["bwn", "xnor"] = "bwn"
    weight_quantizer: str = "ste_sign"
    input_quantizer: str = "ste_sign"
    clip: PositiveFloat = 1.0
    weight_scaling: str = "mean_abs"  # a registered weight scaling (kd_bnn.binary.quantizers.WEIGHT_SCALINGS)
    input_scaling: str = "none"  # none | xnor_k (kd_bnn.binary.quantizers.INPUT_SCALINGS)
    pad_value: float = -1.0  # padding value of binary activations (+1 or -1)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    keep_first: bool = True
    keep_last: bool = True
    keep_depthwise: bool = True
    keep_pointwise: bool = False  # keep 1x1 convs float (fully binary students: Bi-Real/ReActNet practice)
    keep_strided: bool = False  # keep stride > 1 convs float (binary downsampling loses most)
    stages: list[StageConfig] = Field(default_factory=list)
    block: BlockConfig = Field(default_factory=BlockConfig)

    @field_validator("pad_value")
    @classmethod
    def _binary_pad(cls, v: float) -> float:
        if v not in (1.0, -1.0):
            raise ValueError("must be +1 or -1 (a binary value)")
        return v


class StudentConfig(_Section):
    model: ModelConfig | None = None  # None: a copy of the teacher's architecture
    init_from_teacher: bool = True
    binary: BinaryConfig = Field(default_factory=BinaryConfig)
    # a kd_bnn checkpoint of this very student to start from, e.g. stage 2 of two-stage training
    # from stage 1's best.pt (<run>/stage1/best.pt) when the stages run as separate commands
    weights: str | None = None


class DistillTermConfig(_Section):
    loss: str = "mimic_l2"
    weight: NonNegativeFloat = 1.0
    teacher: str | None = None  # tap name or module path; None for output-level losses
    student: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class DistillConfig(_Section):
    enabled: bool = True
    terms: list[DistillTermConfig] = Field(default_factory=list)


class TrainConfig(_Section):
    epochs: PositiveInt = 30
    optimizer: Literal["sgd", "adamw", "adam"] = "adamw"
    lr: PositiveFloat = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    warmup_epochs: NonNegativeFloat = 1.0
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[NonNegativeInt] = Field(default_factory=list)
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    grad_clip: PositiveFloat | None = 10.0  # max gradient norm; null: no clipping
    ema: bool = False
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.9998
    amp: bool = True  # on CUDA only
    eval_interval: PositiveInt = 1
    best_metric: str = "Car/moderate/R40"
    save_interval: PositiveInt = 1
    sync_bn: bool = False


class EvalConfig(_Section):
    conf_thres: Probability = 0.005
    iou_thres: Probability = 0.45
    max_det: PositiveInt = 300


class ExperimentConfig(_Section):
    name: str = "exp"  # the run folder <output_dir>/<name>/: one folder name, e.g. demo_s1 or exp-2
    # without --resume, a run whose folder already exists goes to <name>-2 (-3, ...) instead,
    # unless exist_ok: then it reuses <output_dir>/<name>/
    exist_ok: bool = False
    seed: NonNegativeInt = 0
    device: str = "auto"
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelConfig = Field(default_factory=ModelConfig)
    teacher_train: TrainConfig | None = None  # train the teacher first when set
    student: StudentConfig | None = None  # None: train the teacher only
    # two-stage training (ReActNet): when set, the xnor student first trains with float weights and
    # binary activations (phase "stage1", this schedule), then with binary weights from there (train)
    stage1_train: TrainConfig | None = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _single_path_component(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("expected a run folder name (e.g. demo_s1 or exp-2), not an empty one")
        if ("/" in v or "\\" in v or "\0" in v or v in (".", "..") or os.path.isabs(v)
                or PureWindowsPath(v).drive):
            raise ValueError("expected a single folder name for <output_dir>/<name>/ (e.g. demo_s1 or "
                             "exp-2): no '/' or '\\', not '.' or '..', not an absolute path")
        return v

    @model_validator(mode="after")
    def _stage1_needs_xnor_student(self) -> ExperimentConfig:
        if self.stage1_train is not None:
            if self.student is None:
                raise ValueError("stage1_train: two-stage training trains a binary student; the config has no "
                                 "'student' section")
            if self.student.binary.mode != "xnor":
                raise ValueError("stage1_train: stage 1 trains binary activations with float weights; "
                                 f"student.binary.mode must be 'xnor', found {self.student.binary.mode!r}")
        return self


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_with_base(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``base:`` (a path relative to the file, or a list of them)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' inheritance loops: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_yaml_with_base(path.parent / b, _seen + (path,)))
    return _merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (``lr=1e-3``, ``classes=[Car]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field_info = getattr(cls, "model_fields", {}).get(part)
        if field_info is None:
            return []
        ann = field_info.annotation
        nxt = None
        for cand in getattr(ann, "__args__", (ann,)):
            inner = getattr(cand, "__args__", None)
            for c in (inner or (cand,)):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    nxt = c
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
        if nxt is None:
            return []
        cls = nxt
    return sorted(getattr(cls, "model_fields", {}))


def validate(data: dict, source: str = "<config>") -> ExperimentConfig:
    """Validate a config dict, turning pydantic errors into messages that list the valid keys."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                valid = _valid_keys(ExperimentConfig, loc)
                close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append(f"unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")
            else:
                msg = err["msg"]
                if err["type"] == "value_error":  # our validators: their own sentence, no prefix
                    msg = msg.removeprefix("Value error, ")
                lines.append(f"key '{key}': {msg} (found {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


#: The experiment configs shipped in the package (``kd-bnn train demo`` works from a pip install).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config(path: str | os.PathLike) -> Path:
    """A config file path, or the name of a shipped config (``demo``, ``kitti/darknet_yolov2_bwn_kt``,
    with or without ``.yaml``; ``configs/demo.yaml`` also finds the shipped file outside a checkout)."""
    p = Path(path)
    if p.is_file():
        return p
    name = str(path)[len("configs/"):] if str(path).startswith("configs/") else str(path)
    for cand in (SHIPPED_CONFIGS / name, SHIPPED_CONFIGS / f"{name}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(str(q.relative_to(SHIPPED_CONFIGS).with_suffix("")) for q in SHIPPED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist (nor is it a shipped config: {', '.join(shipped)})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, inherit, override and validate an experiment config (a file, or a shipped config's name)."""
    data = load_yaml_with_base(resolve_config(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(data, str(path) if path else "<defaults>")


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain JSON/YAML-able dict of a config (as written to runs/<name>/config.yaml)."""
    return cfg.model_dump(mode="json")


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        p = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, p + ".")
        elif va != vb:
            out.append(p)
    return out
