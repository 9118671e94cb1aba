"""Export a binary student to a bit-packed .kdbnn file (and optionally ONNX).

    kd-bnn export --model runs/demo/best.pt --out model.kdbnn [--json report.json] [--onnx model.onnx] \\
        [--config CONFIG] [key=value ...]
        (--model: a kd_bnn training checkpoint; its stored config is used unless --config is
        given, key=value overrides apply on top; model=PATH is the same; --checkpoint is its old name)
    kd-bnn export --config configs/kitti/darknet_yolov2_bwn_kt.yaml --out sized.kdbnn
        (no --model: random initialisation, to size an architecture before training)
    kd-bnn export --model runs/demo/best.pt --out w1a8.kdbnn --calibrate data/kitti/training/image_2 --act-bits 8
        (W1A8: the binary-weight convs run on 8-bit activations, ranges measured on the first
        --calib-images images of the folder, as letterboxed for evaluation)
    (python tools/export.py takes the same arguments.)
"""

from __future__ import annotations

import json
import sys

from kd_bnn.cli.common import is_kdbnn, one_model, parser, split_model_override


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = parser(__doc__, prog)
    ap.add_argument("--model", default=None, help="trained student checkpoint (default: random init, "
                                                  "which needs --config)")
    ap.add_argument("--checkpoint", default=None, help="old name of --model")
    ap.add_argument("--config", default=None,
                    help="experiment YAML (the student's architecture; default: the config stored in --model)")
    ap.add_argument("--out", required=True, help="output .kdbnn file")
    ap.add_argument("--json", default=None, help="write the size report as JSON here")
    ap.add_argument("--onnx", default=None, help="also write the float-equivalent graph as ONNX here")
    ap.add_argument("--binarize-float", action="store_true",
                    help="allow a float (teacher) checkpoint: binarize its weights without training")
    ap.add_argument("--allow-input-size-change", action="store_true",
                    help="allow exporting at data.input_size when the checkpoint was trained at another size")
    ap.add_argument("--calibrate", default=None, metavar="DIR",
                    help="images (a folder, file or glob) to calibrate 8-bit activations on (with --act-bits 8)")
    ap.add_argument("--act-bits", type=int, default=None, choices=(8, 32),
                    help="8: binary weights x int8 activations (W1A8, needs --calibrate); 32: float (default)")
    ap.add_argument("--calib-images", type=int, default=64,
                    help="how many images of --calibrate to use (the first, sorted by name; default 64)")
    ap.add_argument("--no-progress", action="store_true", help="accepted for uniformity (export shows none)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (model=PATH: the same as --model)")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    try:
        model_kv, overrides = split_model_override(args.overrides)
    except ValueError as exc:
        ap.error(str(exc))
    checkpoint, flag = one_model(ap, {"--model": args.model, "--checkpoint": args.checkpoint, "model=": model_kv})
    if checkpoint is None and args.config is None:
        ap.error("give --model CHECKPOINT (its stored config is used), or --config CONFIG "
                 "(random initialisation, to size an architecture)")
    if checkpoint is not None and is_kdbnn(checkpoint):
        print(f"error: --model {checkpoint} is already a .kdbnn; export reads a kd_bnn training checkpoint "
              "(runs/<name>/best.pt)", file=sys.stderr)
        return 2

    if args.calib_images < 1:
        ap.error(f"--calib-images must be at least 1, found {args.calib_images}")
    calibration = None
    if args.calibrate is not None:
        from kd_bnn.cli.common import list_images

        try:
            calibration = list_images(args.calibrate)[:args.calib_images]
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: --calibrate: {exc}", file=sys.stderr)
            return 2

    from kd_bnn.cli.common import config_for_model
    from kd_bnn.config import ConfigError
    from kd_bnn.deploy.export import ExportError
    from kd_bnn.engine.checkpoint import CheckpointError
    from kd_bnn.engine.export import check_outputs, export_checkpoint
    from kd_bnn.io import atomic_write_text

    try:
        inputs = {flag: checkpoint, "--config": args.config}
        check_outputs({"--json": args.json}, {**inputs, "--out": args.out, "--onnx": args.onnx})
        check_outputs({"--out": args.out, "--onnx": args.onnx}, inputs)
        if args.config is not None:  # the .kdbnn records the config file it was exported with
            config, source = args.config, args.config
        else:
            config, source = config_for_model(None, overrides, checkpoint, flag)
        rep = export_checkpoint(config, checkpoint, args.out, overrides, onnx=args.onnx,
                                allow_float=args.binarize_float,
                                allow_input_size_change=args.allow_input_size_change,
                                calibration=calibration, act_bits=args.act_bits)
    except (CheckpointError, ConfigError, ExportError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mb = 2**20
    print(f"wrote {rep['path']} ({'random init' if rep['checkpoint'] is None else rep['checkpoint']}; "
          f"config {source})")
    print(f"  float32 model:          {rep['float32_bytes']:>12,} B ({rep['float32_bytes'] / mb:.2f} MB)")
    print(f"  predicted packed bytes: {rep['predicted_packed_bytes']:>12,} B (summary)")
    print(f"  tensor bytes in file:   {rep['tensor_bytes']:>12,} B")
    print(f"  file bytes:             {rep['file_bytes']:>12,} B ({rep['file_bytes'] / mb:.2f} MB; "
          f"header+metadata {rep['header_bytes']:,} B)")
    print(f"  file / predicted:       {rep['size_vs_prediction']:.4f}")
    print(f"  compression:            {rep['compression']:.1f}x (float32 / file), "
          f"{rep['predicted_compression']:.1f}x predicted; {rep['num_binary_convs']} binary, "
          f"{rep['num_float_convs']} float convs")
    print(f"  binary MACs:            {100 * rep['binary_mac_fraction']:.1f}% of all conv MACs at "
          f"{rep['input_size'][0]}x{rep['input_size'][1]}")
    if "w1a8_convs" in rep:
        print(f"  8-bit activations:      {rep['w1a8_convs']} binary-weight convs run W1A8 (calibrated on "
              f"{rep['calibration_images']} images)")
    if "onnx" in rep:
        o = rep["onnx"]
        print(f"  onnx: skipped - {o['skipped']}" if "skipped" in o else f"  onnx: {o['path']} ({o['bytes']:,} B)")
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
