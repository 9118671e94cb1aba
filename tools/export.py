"""Export a binary student to a bit-packed .kdbnn file (and optionally ONNX).

    python tools/export.py --config configs/demo.yaml --checkpoint runs/demo/best.pt --out model.kdbnn \
        [--json report.json] [--onnx model.onnx] [key=value ...]
    python tools/export.py --config configs/kitti/darknet_yolov2_bwn_kt.yaml --out sized.kdbnn
        (no --checkpoint: random initialisation, to size an architecture before training)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (the student's architecture)")
    ap.add_argument("--checkpoint", default=None, help="trained student checkpoint (default: random init)")
    ap.add_argument("--out", required=True, help="output .kdbnn file")
    ap.add_argument("--json", default=None, help="write the size report as JSON here")
    ap.add_argument("--onnx", default=None, help="also write the float-equivalent graph as ONNX here")
    ap.add_argument("--binarize-float", action="store_true",
                    help="allow a float (teacher) checkpoint: binarize its weights without training")
    ap.add_argument("--allow-input-size-change", action="store_true",
                    help="allow exporting at data.input_size when the checkpoint was trained at another size")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)

    from kd_bnn.config import ConfigError
    from kd_bnn.deploy.export import ExportError
    from kd_bnn.engine.checkpoint import CheckpointError
    from kd_bnn.engine.export import check_outputs, export_checkpoint
    from kd_bnn.io import atomic_write_text

    try:
        check_outputs({"--json": args.json}, {"--checkpoint": args.checkpoint, "--config": args.config,
                                              "--out": args.out, "--onnx": args.onnx})
        rep = export_checkpoint(args.config, args.checkpoint, args.out, args.overrides, onnx=args.onnx,
                                allow_float=args.binarize_float,
                                allow_input_size_change=args.allow_input_size_change)
    except (CheckpointError, ConfigError, ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mb = 2**20
    print(f"wrote {rep['path']} ({'random init' if rep['checkpoint'] is None else rep['checkpoint']})")
    print(f"  float32 model:          {rep['float32_bytes']:>12,} B ({rep['float32_bytes'] / mb:.2f} MB)")
    print(f"  predicted packed bytes: {rep['predicted_packed_bytes']:>12,} B (summary)")
    print(f"  tensor bytes in file:   {rep['tensor_bytes']:>12,} B")
    print(f"  file bytes:             {rep['file_bytes']:>12,} B ({rep['file_bytes'] / mb:.2f} MB; "
          f"header+metadata {rep['header_bytes']:,} B)")
    print(f"  file / predicted:       {rep['size_vs_prediction']:.4f}")
    print(f"  compression:            {rep['compression']:.1f}x (float32 / file), "
          f"{rep['predicted_compression']:.1f}x predicted; {rep['num_binary_convs']} binary, "
          f"{rep['num_float_convs']} float convs")
    if "onnx" in rep:
        o = rep["onnx"]
        print(f"  onnx: skipped - {o['skipped']}" if "skipped" in o else f"  onnx: {o['path']} ({o['bytes']:,} B)")
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
