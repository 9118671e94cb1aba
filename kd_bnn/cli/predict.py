"""Detect objects with a model in an image, a folder of images or a glob: KITTI result files and
images with boxes drawn.

    kd-bnn predict --model model.kdbnn --source DIR|FILE|'GLOB' --out DIR [--conf 0.3] [--iou 0.45]
        -> DIR/data/<image stem>.txt (KITTI result format), DIR/images/<image stem>.png
  --model: a .kdbnn (the packed runtime), or a kd_bnn training checkpoint (the torch model, built
  from the checkpoint's stored config or --config, with key=value overrides); model=PATH is the
  same. --images is the old name of --source. Quote a glob ('frames/*.png') so the shell leaves
  it to kd-bnn.
  (python tools/infer.py takes the same arguments.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kd_bnn.cli.common import is_kdbnn, list_images, one_model, parser, split_model_override


class _CheckpointModel:
    """A checkpoint's model behind the calls `kd_bnn.deploy.runtime.predict_images` makes of a `Runtime`."""

    backend = "torch"

    def __init__(self, cfg, checkpoint: str, device: str | None):
        from kd_bnn.engine.distributed import resolve_device
        from kd_bnn.engine.evaluate import load_teacher, load_trained_student

        self.path = Path(checkpoint)
        model = load_trained_student(cfg, checkpoint) if cfg.student is not None else load_teacher(cfg, checkpoint)
        self.device = resolve_device(device if device is not None else cfg.device)
        self.model = model.to(self.device).eval()
        self.class_names = list(cfg.data.classes)
        self.input_size = tuple(int(v) for v in cfg.data.input_size)

    def predict(self, images, conf_thres: float, iou_thres: float, max_det: int):
        import torch

        with torch.no_grad():
            return self.model.predict(self.model(images.to(self.device)), conf_thres=conf_thres,
                                      iou_thres=iou_thres, max_det=max_det)

    def __repr__(self) -> str:
        h, w = self.input_size
        return (f"{type(self.model).__name__}({self.path.name}, input ({h}, {w}), classes {self.class_names}, "
                f"torch on {self.device})")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = parser(__doc__, prog)
    ap.add_argument("--model", default=None, help=".kdbnn file (kd-bnn export) or kd_bnn training checkpoint")
    ap.add_argument("--source", default=None, help="an image file, a folder of .png/.jpg images, or a glob")
    ap.add_argument("--images", default=None, help="old name of --source")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default=None, help="experiment YAML of a checkpoint (default: its stored config)")
    ap.add_argument("--conf", type=float, default=0.3, help="confidence threshold (default 0.3)")
    ap.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    ap.add_argument("--max-det", type=int, default=300, help="most detections per image (default 300)")
    ap.add_argument("--threads", type=int, default=None, help="torch/kernel threads")
    ap.add_argument("--device", default=None, help="device of a checkpoint's torch model (default: the config's)")
    ap.add_argument("--no-draw", action="store_true", help="write result files only")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", default=None, help="write the detection counts per image as JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value of a checkpoint "
                                                 "(model=PATH: the same as --model)")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    try:
        model_kv, overrides = split_model_override(args.overrides)
    except ValueError as exc:
        ap.error(str(exc))
    model_path, _ = one_model(ap, {"--model": args.model, "model=": model_kv})
    source, _ = one_model(ap, {"--source": args.source, "--images": args.images})
    if model_path is None:
        ap.error("the following arguments are required: --model")
    if source is None:
        ap.error("the following arguments are required: --source (an image, a folder or a glob)")
    kdbnn = is_kdbnn(model_path)
    if kdbnn and (overrides or args.config):
        ap.error("--config and key=value overrides apply to a checkpoint; a .kdbnn carries its model")

    from kd_bnn.cli.common import backend_line, config_for_model, teacher_phase_config
    from kd_bnn.config import ConfigError
    from kd_bnn.deploy.format import FormatError
    from kd_bnn.engine.checkpoint import CheckpointError

    try:
        if kdbnn:
            from kd_bnn.deploy.runtime import Runtime

            model = Runtime(model_path, threads=args.threads)
        else:
            if args.threads is not None:
                import torch

                torch.set_num_threads(int(args.threads))
            cfg, _ = config_for_model(args.config, overrides, model_path)
            if args.config is None:
                cfg, note = teacher_phase_config(cfg, model_path)
                if note:
                    print(note)
            model = _CheckpointModel(cfg, model_path, args.device)
        files = list_images(source)
        from kd_bnn.deploy.runtime import predict_images

        res = predict_images(model, files, args.out, args.conf, args.iou, args.max_det, draw=not args.no_draw,
                             progress=not args.no_progress and sys.stderr.isatty())
        if args.json:
            from kd_bnn.io import atomic_write_text

            atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    except (CheckpointError, ConfigError, FormatError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(res["detections"].values())
    print(backend_line(model.backend) if kdbnn
          else f"backend: torch on {model.device} (a checkpoint's model, binary layers simulated in float; "
               "export it for the packed kernels)")
    print(f"{model}: {res['images']} images, {total} detections (conf >= {args.conf}) -> {res['out']}/data"
          + ("" if args.no_draw else f", {res['out']}/images"))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
