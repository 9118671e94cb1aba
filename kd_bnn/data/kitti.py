"""KITTI 2D object labels: reading, writing, splits and the devkit's difficulty levels.

Label line (Geiger et al., CVPR 2012; devkit `readme.txt`), space separated:
``type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]``
15 fields in ground truth, a 16th ``score`` in result files.

Bad input, one rule per case (`parse_label_lines`, `read_label_file`):

* a UTF-8 byte-order mark at the start of a file is stripped (it is not part of the first type);
* a file that is not UTF-8 text is a `KittiFormatError` naming the file and line;
* every numeric field must be a finite number: ``nan``, ``inf`` and ``-inf`` are a
  `KittiFormatError` naming file, line and field (the score of result lines included);
* a box with x2 < x1 or y2 < y1: refused in result lines (as the evaluator refuses such
  detections); kept in ground truth by default, because the devkit reads it and scores it
  (height y2 - y1 < 0 is below every difficulty's minimum height, so a y-inverted object is
  ignored; an x-inverted one of valid height overlaps no detection and counts as missed) and
  `kd_bnn.eval.kitti` must give the devkit's numbers; ``strict_boxes=True`` (what `KittiDataset`, i.e. training and validation, reads
  with) refuses it with file:line, since a training target cannot be made of it;
* type names are not checked here: `KittiDataset` counts names outside `KITTI_TYPES`
  (case-sensitive, so ``car`` is unknown) and reports them in one warning per split.
"""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Every object type in the official training labels.
KITTI_TYPES = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare",
)
DEFAULT_CLASSES = ("Car", "Pedestrian", "Cyclist")

FIELD_NAMES = (
    "type", "truncated", "occluded", "alpha", "x1", "y1", "x2", "y2",
    "h", "w", "l", "x", "y", "z", "rotation_y", "score",
)

# Difficulty thresholds of the devkit's evaluate_object.cpp: Easy, Moderate, Hard.
MIN_HEIGHT = (40.0, 25.0, 25.0)
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.30, 0.50)
DIFFICULTIES = ("easy", "moderate", "hard")


class KittiFormatError(ValueError):
    """A label or result file that does not follow the KITTI format."""


class KittiDataWarning(UserWarning):
    """KITTI data that can be used but is probably not what was meant (unknown object types,
    zero-area boxes, an unreadable image skipped during a run)."""


def decode_text(data: bytes, path: str | os.PathLike) -> str:
    """`data` as UTF-8 text without a leading byte-order mark.

    Raises:
        KittiFormatError: one line naming the file and the line of the first byte that is not UTF-8.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise KittiFormatError(
            f"{path}:{lineno}: not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "expected a KITTI label file") from None


@dataclass
class FrameLabels:
    """All objects of one frame as parallel numpy arrays (fast to evaluate).

    Attributes:
        types: object type names, shape (N,).
        truncated, occluded, alpha: per object, (N,).
        boxes: 2D boxes x1, y1, x2, y2 in image pixels, (N, 4) float64.
        dims: h, w, l in metres, (N, 3).
        loc: x, y, z in camera coordinates, (N, 3).
        rotation_y: (N,).
        scores: detection scores (N,) for result files, None for ground truth.
    """

    types: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0))
    occluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    alpha: np.ndarray = field(default_factory=lambda: np.zeros(0))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    dims: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    loc: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    rotation_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.types)

    @property
    def heights(self) -> np.ndarray:
        return self.boxes[:, 3] - self.boxes[:, 1]

    def select(self, mask: np.ndarray) -> FrameLabels:
        """Objects where `mask` is true."""
        return FrameLabels(
            self.types[mask], self.truncated[mask], self.occluded[mask], self.alpha[mask],
            self.boxes[mask], self.dims[mask], self.loc[mask], self.rotation_y[mask],
            None if self.scores is None else self.scores[mask],
        )


def _bad(path: str | os.PathLike, lineno: int, field_name: str, expected: str, found: str) -> KittiFormatError:
    return KittiFormatError(f"{path}:{lineno}: field '{field_name}': expected {expected}, found {found!r}")


def parse_label_lines(lines: list[str], path: str | os.PathLike = "<string>",
                      with_score: bool | None = None, strict_boxes: bool = False) -> FrameLabels:
    """Parse label lines into a `FrameLabels`.

    Args:
        lines: the text lines of one file (blank lines are skipped; a byte-order mark opening
            the first line is dropped).
        path: file name used in error messages.
        with_score: True requires 16 fields (result files), False requires 15 (ground truth),
            None accepts either (all lines of a file must agree).
        strict_boxes: refuse ground-truth boxes with x2 < x1 or y2 < y1 too. Result lines (with
            a score) always refuse them, as the evaluator does; ground truth keeps them by default
            because the official devkit reads and scores them (a negative height is below every
            difficulty's minimum height, so the object is ignored; an x-inverted box of valid
            height overlaps nothing and counts as missed) and the evaluator must match it.

    Raises:
        KittiFormatError: naming the file, line number and field that is wrong: a wrong field
            count, a non-number, a non-finite number (nan, inf, -inf), a non-integer occlusion,
            or an inverted box (see `strict_boxes`).
    """
    types, nums, lnos = [], [], []
    n_fields = None
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        parts = line.split()
        if not parts:
            continue
        n = len(parts)
        allowed = (15, 16) if with_score is None else ((16,) if with_score else (15,))
        if n not in allowed:
            exp = " or ".join(str(a) for a in allowed)
            raise KittiFormatError(
                f"{path}:{lineno}: expected {exp} fields "
                f"(type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]), "
                f"found {n}: {line.strip()!r}"
            )
        if n_fields is None:
            n_fields = n
        elif n != n_fields:
            raise KittiFormatError(
                f"{path}:{lineno}: expected {n_fields} fields like the lines before, found {n}"
            )
        row = []
        for i, tok in enumerate(parts[1:], 1):
            try:
                v = float(tok)
            except ValueError:
                raise _bad(path, lineno, FIELD_NAMES[i], "a number", tok) from None
            if not math.isfinite(v):
                raise _bad(path, lineno, FIELD_NAMES[i], "a finite number", tok)
            row.append(v)
        occ = row[1]
        if occ != int(occ):
            raise _bad(path, lineno, "occluded", "an integer (0, 1, 2, 3 or -1)", parts[2])
        x1, y1, x2, y2 = row[3:7]
        if (x2 < x1 or y2 < y1) and (strict_boxes or n == 16):
            raise KittiFormatError(
                f"{path}:{lineno}: negative-size box x1 y1 x2 y2 = {parts[4]} {parts[5]} {parts[6]} {parts[7]} "
                f"(expected x2 >= x1 and y2 >= y1)")
        types.append(parts[0])
        nums.append(row)
        lnos.append(lineno)
    if not nums:
        out = FrameLabels()
        if with_score:
            out.scores = np.zeros(0)
        return out
    arr = np.asarray(nums, dtype=np.float64)
    return FrameLabels(
        types=np.asarray(types, dtype=object),
        truncated=arr[:, 0],
        occluded=arr[:, 1].astype(np.int64),
        alpha=arr[:, 2],
        boxes=arr[:, 3:7].copy(),
        dims=arr[:, 7:10].copy(),
        loc=arr[:, 10:13].copy(),
        rotation_y=arr[:, 13],
        scores=arr[:, 14].copy() if arr.shape[1] == 15 else None,
    )


def read_label_file(path: str | os.PathLike, with_score: bool | None = None,
                    strict_boxes: bool = False) -> FrameLabels:
    """Read one label_2 (15 fields) or result (16 fields) file (see `parse_label_lines`).

    Raises:
        KittiFormatError: a malformed line (file, line, field) or a file that is not UTF-8 text.
    """
    with open(path, "rb") as fh:
        text = decode_text(fh.read(), path)
    return parse_label_lines(text.splitlines(), path, with_score, strict_boxes)


def format_label_line(typ: str, truncated: float, occluded: int, alpha: float, box, dims=(-1, -1, -1),
                      loc=(-1000, -1000, -1000), rotation_y: float = -10, score: float | None = None) -> str:
    """One label line in the devkit's format (two decimals, occlusion as an integer)."""
    vals = [truncated, alpha, *box, *dims, *loc, rotation_y]
    txt = f"{typ} {vals[0]:.2f} {int(occluded)} " + " ".join(f"{v:.2f}" for v in vals[1:])
    if score is not None:
        txt += f" {score:.4f}" if abs(score) < 1e4 else f" {score:.6g}"
    return txt


def format_labels(labels: FrameLabels) -> str:
    """The text of a label file for `labels` (with scores when it has them)."""
    out = []
    for i in range(len(labels)):
        out.append(format_label_line(
            labels.types[i], labels.truncated[i], labels.occluded[i], labels.alpha[i],
            labels.boxes[i], labels.dims[i], labels.loc[i], labels.rotation_y[i],
            None if labels.scores is None else float(labels.scores[i]),
        ))
    return "".join(line + "\n" for line in out)


def write_label_file(path: str | os.PathLike, labels: FrameLabels) -> None:
    """Write `labels` to `path` atomically."""
    from kd_bnn.io import atomic_write_text

    atomic_write_text(path, format_labels(labels))


def difficulty_of(labels: FrameLabels) -> np.ndarray:
    """Easiest difficulty each ground-truth object counts for: 0 easy, 1 moderate, 2 hard, -1 none.

    As the devkit's cleanData: an object is ignored at a level when occlusion > max, truncation >
    max, or box height <= the minimum height (ground truth uses <=, detections use <).
    """
    h = labels.heights
    level = np.full(len(labels), -1, dtype=np.int64)
    for d in (2, 1, 0):
        ok = (labels.occluded <= MAX_OCCLUSION[d]) & (labels.truncated <= MAX_TRUNCATION[d]) & (h > MIN_HEIGHT[d])
        level[ok] = d
    return level


def read_split(path: str | os.PathLike) -> list[str]:
    """Frame ids (e.g. '000123') of a split file, one per line (blank lines and a leading
    byte-order mark are skipped).

    An id listed twice is refused: training would use that frame twice as often, and the devkit
    evaluation would count its objects twice and change the AP.

    Raises:
        FileNotFoundError: a missing split file.
        KittiFormatError: an empty split, a file that is not UTF-8 text, a non-numeric id
            (``<file>:<line>: expected a numeric frame id, found 'x'``) or an id listed twice
            (``<file>:<line>: frame id '000123' is listed twice (first on line 4)``), with the
            real line number in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    first: dict[str, int] = {}
    for lineno, line in enumerate(decode_text(path.read_bytes(), path).splitlines(), 1):
        fid = line.strip()
        if not fid:
            continue
        if not (fid.isascii() and fid.isdigit()):
            raise KittiFormatError(f"{path}:{lineno}: expected a numeric frame id, found {fid!r}")
        if fid in first:
            raise KittiFormatError(
                f"{path}:{lineno}: frame id {fid!r} is listed twice (first on line {first[fid]})")
        first[fid] = lineno
    if not first:
        raise KittiFormatError(f"split file {path} is empty: expected one frame id per line")
    return list(first)


def frame_ids_in(directory: str | os.PathLike, suffix: str = ".txt") -> list[str]:
    """Sorted frame ids of the files with `suffix` in `directory`."""
    return sorted(p[: -len(suffix)] for p in os.listdir(directory) if p.endswith(suffix))
