"""The official KITTI 2D object evaluation (devkit ``evaluate_object.cpp``, 2019), vectorized.

Reproduces the devkit's 2D bounding-box protocol (Geiger et al., "Are we ready for autonomous
driving? The KITTI vision benchmark suite", CVPR 2012; 40 recall positions: Simonelli et al.,
"Disentangling Monocular 3D Object Detection", ICCV 2019) number for number:

* ``cleanData``: per class and difficulty, ground truth is *valid* (0), *ignored* (1: the
  neighbouring class Van for Car / Person_sitting for Pedestrian, or too occluded, truncated or
  small: height <= MIN_HEIGHT) or *other* (-1); detections are ignored (1) when their height,
  truncated to an integer, is < MIN_HEIGHT (whatever their class), valid (0) when of the class,
  else other (-1). Class names compare case-insensitively.
* ``computeStatistics``: ground truth in file order greedily takes one detection with IoU >
  the class threshold (Car 0.7, Pedestrian/Cyclist 0.5). Without a score threshold (the recall
  pass) it takes the highest-scoring candidate; with a threshold (the precision pass) it takes
  the valid candidate of largest overlap, else the first ignored one. Unassigned valid
  detections covering a DontCare region (intersection over *detection* area > threshold) are
  not false positives.
* ``getThresholds``: from the scores of the recall pass's true positives, the scores closest
  to 41 linearly spaced recall values; ``eval_class`` recomputes TP/FP/FN at each and takes
  the running maximum of precision from the right.
* AP_R40 = mean of the 40 interpolated precisions 1..40; AP_R11 = mean of every 4th of the 41
  (indices 0, 4, ..., 40); both in percent, summed in float32 as the devkit's
  ``saveAndPlotPlots`` does (so the digits match what it prints).

Like the devkit, precision is stored by threshold *index*, not by recall: with fewer than 41 true
positives there are fewer than 41 thresholds and the tail of the curve stays 0 (e.g. exactly 40
perfectly detected cars give AP_R40 = 97.5; 41 or more give 100).

The devkit re-runs the greedy matching per frame and per threshold. Here every candidate pair
(IoU above the threshold) is an edge, and the choice rule of each pass is a fixed priority order
of a ground truth's edges, so "the best available candidate" is "the first available edge".
Ground truths whose candidates no other ground truth shares are decided for all thresholds in
one vectorized step; the others run one rank at a time (the k-th such ground truth of every
frame together) on a (thresholds x edges) availability matrix. Same assignment as the devkit's
loops, no approximation (checked against a loop transcription and the devkit binary).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kd_bnn.data.kitti import (
    DEFAULT_CLASSES,
    DIFFICULTIES,
    KITTI_TYPES,
    MAX_OCCLUSION,
    MAX_TRUNCATION,
    MIN_HEIGHT,
    FrameLabels,
    KittiFormatError,
    decode_text,
    parse_label_lines,
    read_split,
)

#: Minimum IoU per class in the devkit's 2D evaluation (strictly greater than).
MIN_OVERLAP = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}
#: Neighbouring classes the devkit ignores (neither TP nor FN) when evaluating a class.
NEIGHBOUR = {"car": "van", "pedestrian": "person_sitting"}
#: Recall sample points of the devkit.
N_SAMPLE_PTS = 41
#: The devkit's "no detection" sentinel: scores must be above it to be picked in the recall pass.
_NO_DETECTION = -10000000.0
_KNOWN_TYPES = {t.lower() for t in KITTI_TYPES}
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark (codecs.BOM_UTF8)


# --------------------------------------------------------------------------------------------
# Flat storage of many frames
# --------------------------------------------------------------------------------------------
@dataclass
class KittiFlat:
    """Objects of many frames concatenated (frame i owns rows offsets[i]:offsets[i+1]).

    types are lower-case names (the devkit compares case-insensitively).
    """

    frame_ids: list[str]
    offsets: np.ndarray  # (F+1,) int64
    types: np.ndarray  # (N,) str
    boxes: np.ndarray  # (N, 4) float64 x1 y1 x2 y2
    truncated: np.ndarray  # (N,)
    occluded: np.ndarray  # (N,) int64
    scores: np.ndarray | None = None  # (N,) for detections
    raw_types: np.ndarray | None = None  # original spelling

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def frame_of_rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.frame_ids)), self.counts)

    def to_frames(self) -> dict[str, FrameLabels]:
        """Back to one `FrameLabels` per frame (only the fields the 2D evaluation uses)."""
        out = {}
        names = self.raw_types if self.raw_types is not None else self.types
        for i, fid in enumerate(self.frame_ids):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            n = b - a
            out[fid] = FrameLabels(
                types=np.asarray([str(t) for t in names[a:b]], dtype=object),
                truncated=self.truncated[a:b].copy(), occluded=self.occluded[a:b].copy(),
                alpha=np.full(n, -10.0), boxes=self.boxes[a:b].copy(),
                dims=np.full((n, 3), -1.0), loc=np.full((n, 3), -1000.0),
                rotation_y=np.full(n, -10.0),
                scores=None if self.scores is None else self.scores[a:b].copy(),
            )
        return out


def _flat_from_frames(frames: Mapping[str, FrameLabels], ids: Sequence[str], *, detections: bool,
                      ) -> KittiFlat:
    """Concatenate `frames[id]` for `ids` (a missing id is an empty frame)."""
    counts = np.zeros(len(ids), dtype=np.int64)
    types, boxes, trunc, occ, scores = [], [], [], [], []
    for i, fid in enumerate(ids):
        fl = frames.get(fid)
        if fl is None or len(fl) == 0:
            continue
        counts[i] = len(fl)
        types.append(np.asarray(fl.types, dtype=object))
        b = np.asarray(fl.boxes, dtype=np.float64).reshape(-1, 4)
        boxes.append(b)
        trunc.append(np.asarray(fl.truncated, dtype=np.float64))
        occ.append(np.asarray(fl.occluded, dtype=np.int64))
        if detections:
            if fl.scores is None:
                raise ValueError(f"detections of frame {fid!r} have no scores")
            s = np.asarray(fl.scores, dtype=np.float64)
            scores.append(s)
            _check_det_values(b, s, lambda k, fid=fid: f"detections of frame {fid!r}, object {k}")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if types:
        raw = np.concatenate(types).astype(str)
        flat = KittiFlat(list(ids), offsets, np.char.lower(raw), np.concatenate(boxes),
                         np.concatenate(trunc), np.concatenate(occ),
                         np.concatenate(scores) if detections else None, raw)
    else:
        flat = KittiFlat(list(ids), offsets, np.zeros(0, dtype=str), np.zeros((0, 4)), np.zeros(0),
                         np.zeros(0, dtype=np.int64), np.zeros(0) if detections else None,
                         np.zeros(0, dtype=str))
    return flat


def _check_det_values(boxes: np.ndarray, scores: np.ndarray, where) -> None:
    """NaN, inf or -inf anywhere or a box with x2 < x1 or y2 < y1 -> ValueError naming the object."""
    bad_value = ~(np.isfinite(boxes).all(axis=1) & np.isfinite(scores))
    bad_size = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad_value.any():
        k = int(np.flatnonzero(bad_value)[0])
        raise ValueError(f"{where(k)}: expected finite numbers, found box {boxes[k].tolist()} "
                         f"and score {scores[k]} (nan, inf and -inf are refused)")
    if bad_size.any():
        k = int(np.flatnonzero(bad_size)[0])
        raise ValueError(f"{where(k)}: negative-size box x1 y1 x2 y2 = {boxes[k].tolist()} "
                         "(expected x2 >= x1 and y2 >= y1)")


# --------------------------------------------------------------------------------------------
# Fast bulk reading of label / result folders
# --------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # no such file / its folder is a file
        return None
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _bulk_parse(texts: list[bytes | None], paths: list[str], ids: list[str], n_fields: int,
                ) -> KittiFlat:
    """Parse many label (15 fields) or result (16 fields) files at once.

    The fast path splits every file into tokens, converts the columns the 2D evaluation reads
    (ground truth: truncated, occluded, box; results: box, score) and checks that every other
    field is a number too (once per distinct token). Any irregularity (wrong field count, a
    non-number, nan / inf / -inf, a non-integer occlusion, a type that is not UTF-8) re-reads
    the files with `kd_bnn.data.kitti.decode_text` and `parse_label_lines` for the precise error
    (file, line, field). `texts` must already be without a leading byte-order mark
    (`read_kitti_dir` strips it).
    Results keep truncated/occluded as -1 (the devkit does not read them either).
    """
    with_score = n_fields == 16
    # tokens file by file (as fast as one split of everything): a file's objects are its own
    # tokens, and a file must hold n_fields tokens per non-blank line (else the slow path names
    # the line); a line of n_fields tokens that is misaligned (e.g. 16 + 14) shows in the type
    # column below
    counts = np.zeros(len(texts), dtype=np.int64)
    toks: list[bytes] = []
    for i, b in enumerate(texts):
        if not b:
            continue
        sp = b.split()
        n_obj, rest = divmod(len(sp), n_fields)
        if rest or (n_obj != b.count(b"\n") + (not b.endswith(b"\n"))
                    and n_obj != sum(1 for ln in b.splitlines() if ln.strip())):
            _slow_check(texts, paths, with_score, only=[i])
        counts[i] = n_obj
        toks.extend(sp)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not toks:
        return KittiFlat(list(ids), offsets, np.zeros(0, dtype=str), np.zeros((0, 4)), np.zeros(0),
                         np.zeros(0, dtype=np.int64), np.zeros(0) if with_score else None,
                         np.zeros(0, dtype=str))
    # numbers: the columns the 2D evaluation reads are converted, the others only validated
    # (a set of distinct tokens per column, so repeated placeholders cost nothing)
    used = (4, 5, 6, 7, 15) if with_score else (1, 2, 4, 5, 6, 7)
    cols: dict[int, np.ndarray] = {}
    uniq, inv = np.unique(np.array(toks[0::n_fields]), return_inverse=True)
    try:
        # strict: a non-UTF-8 byte sits in some token (bytes.split() splits at ASCII whitespace
        # only); in a type it fails here, in a number float() fails: the slow path names it
        uniq_s = [u.decode("utf-8") for u in uniq]  # UnicodeDecodeError is a ValueError
        if any(_is_number(u) for u in uniq_s):
            raise ValueError
        for k in range(1, n_fields):
            if k in used:
                col = np.array(list(map(float, toks[k::n_fields])), dtype=np.float64)
                if not np.isfinite(col).all():
                    raise ValueError
                cols[k] = col
            else:
                for tok in set(toks[k::n_fields]):
                    if not math.isfinite(float(tok)):
                        raise ValueError
        if not with_score and not np.array_equal(cols[2], np.round(cols[2])):
            raise ValueError
    except ValueError:
        _slow_check(texts, paths, with_score)
        raise KittiFormatError("malformed label files (no single file could be blamed)") from None
    n = len(toks) // n_fields
    boxes = np.stack([cols[4], cols[5], cols[6], cols[7]], axis=1)
    raw = np.asarray(uniq_s)[inv.reshape(-1)]
    lower = np.char.lower(np.asarray(uniq_s))[inv.reshape(-1)]
    flat = KittiFlat(list(ids), offsets, lower, boxes,
                     cols[1] if not with_score else np.full(n, -1.0),
                     cols[2].astype(np.int64) if not with_score else np.full(n, -1, dtype=np.int64),
                     cols[15] if with_score else None, raw)
    if with_score:
        bad = (flat.boxes[:, 2] < flat.boxes[:, 0]) | (flat.boxes[:, 3] < flat.boxes[:, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            fi = int(np.searchsorted(offsets, row, side="right") - 1)
            k = row - int(offsets[fi])
            lineno = _nonblank_lineno(texts[fi], k, paths[fi])
            raise KittiFormatError(
                f"{paths[fi]}:{lineno}: negative-size box x1 y1 x2 y2 = {flat.boxes[row].tolist()} "
                "(expected x2 >= x1 and y2 >= y1)")
    return flat


def _nonblank_lineno(text: bytes, k: int, path: str) -> int:
    n = -1
    for lineno, line in enumerate(decode_text(text, path).splitlines(), 1):
        if line.split():
            n += 1
            if n == k:
                return lineno
    return 0


def _slow_check(texts, paths, with_score, only=None) -> None:
    """Parse the files (all, or those of `only`) one by one, as `read_label_file` does: the first
    problem raises KittiFormatError naming file and line (a file that is not UTF-8 included)."""
    for i in (range(len(texts)) if only is None else only):
        if texts[i]:
            parse_label_lines(decode_text(texts[i], paths[i]).splitlines(), paths[i], with_score)
    if only is not None:
        raise KittiFormatError(f"{paths[only[0]]}: malformed label file")


def read_kitti_dir(directory: str | os.PathLike, ids: Sequence[str], *, results: bool,
                   strict: bool = True) -> tuple[KittiFlat, list[str]]:
    """Read `ids` from a label_2 folder (15 fields) or a result folder (16 fields).

    Returns the flat objects and the ids whose file is missing (empty frames). With `strict`,
    a missing file raises FileNotFoundError listing the first few. A UTF-8 byte-order mark
    opening a file is dropped (as `kd_bnn.data.kitti.read_label_file` does).

    Raises:
        KittiFormatError: a malformed line, nan / inf / -inf, a file that is not UTF-8 text
            (file and line named), or an inverted box in a result file.
    """
    directory = str(directory)
    paths = [os.path.join(directory, f"{i}.txt") for i in ids]
    texts = [_read_bytes(p) for p in paths]
    texts = [t[len(_BOM):] if t is not None and t.startswith(_BOM) else t for t in texts]
    missing = [i for i, t in zip(ids, texts) if t is None]
    if missing and strict:
        kind = "result" if results else "label"
        raise FileNotFoundError(
            f"{len(missing)} {kind} file(s) missing in {directory}, e.g. "
            + ", ".join(f"{m}.txt" for m in missing[:5]))
    return _bulk_parse(texts, paths, list(ids), 16 if results else 15), missing


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------
@dataclass
class KittiEvalResult:
    """AP of the devkit's 2D evaluation and the curves behind it.

    Attributes:
        ap: {class: {"R11": {easy, moderate, hard}, "R40": {...}}} in percent.
        precision: {class: (3, 41)} interpolated precision per difficulty (devkit's plot data).
        recall: {class: (3, 41)} recall at the score thresholds (NaN past the last threshold).
        thresholds: {class: [3 arrays]} the score thresholds of getThresholds.
        num_gt: {class: (easy, moderate, hard)} valid ground truth counts (recall denominators).
        evaluated: {class: bool} whether the devkit would evaluate the class (it skips a class
            that has no detection with x1 >= 0); AP is computed either way (0 with none).
        num_frames, missing_results: frames evaluated, result files absent (counted as empty).
        unknown_classes: detection type names that are not KITTI types, with counts (ignored).
    """

    ap: dict[str, dict[str, dict[str, float]]]
    precision: dict[str, np.ndarray]
    recall: dict[str, np.ndarray]
    thresholds: dict[str, list[np.ndarray]]
    num_gt: dict[str, tuple[int, int, int]]
    evaluated: dict[str, bool]
    num_frames: int = 0
    missing_results: int = 0
    unknown_classes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """``{"bbox_2d": {class: {"R11": {...}, "R40": {...}}}}`` as in the issue."""
        return {"bbox_2d": {c: {k: dict(v) for k, v in d.items()} for c, d in self.ap.items()}}

    def table(self) -> str:
        """Text table of AP per class, difficulty and AP kind."""
        from kd_bnn.eval.report import kitti_table

        return kitti_table(self)

    def mean_ap(self, kind: str = "R40", difficulty: str = "moderate") -> float:
        """Mean over classes (the usual single number, e.g. moderate AP_R40)."""
        vals = [d[kind][difficulty] for d in self.ap.values()]
        return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------------
def _overlaps(det_boxes: np.ndarray, other: np.ndarray, criterion: int) -> np.ndarray:
    """The devkit's imageBoxOverlap(det, other): -1 IoU, 0 intersection over det area."""
    x1 = np.maximum(det_boxes[:, 0], other[:, 0])
    y1 = np.maximum(det_boxes[:, 1], other[:, 1])
    x2 = np.minimum(det_boxes[:, 2], other[:, 2])
    y2 = np.minimum(det_boxes[:, 3], other[:, 3])
    w = x2 - x1
    h = y2 - y1
    ok = (w > 0) & (h > 0)
    inter = w * h
    a_area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        if criterion == -1:
            b_area = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
            o = inter / (a_area + b_area - inter)
        else:
            o = inter / a_area
    return np.where(ok, o, 0.0)


def _pairs(gt_rows: np.ndarray, gt_frame: np.ndarray, det_rows: np.ndarray, det_frame: np.ndarray,
           n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """All (gt, det) row pairs of the same frame (rows given sorted by frame)."""
    g_cnt = np.bincount(gt_frame, minlength=n_frames)
    d_cnt = np.bincount(det_frame, minlength=n_frames)
    g_off = np.concatenate([[0], np.cumsum(g_cnt)])
    d_off = np.concatenate([[0], np.cumsum(d_cnt)])
    per = g_cnt * d_cnt
    total = int(per.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    f = np.repeat(np.arange(n_frames), per)
    start = np.concatenate([[0], np.cumsum(per)])[:-1]
    k = np.arange(total) - start[f]
    dc = d_cnt[f]
    gi = g_off[f] + k // dc
    dj = d_off[f] + k % dc
    return gt_rows[gi], det_rows[dj]


def _first_per_segment(ok: np.ndarray, seg_start: np.ndarray, n: int) -> np.ndarray:
    """Index (0..n-1) of the first True column of each segment per row, n where none."""
    pos = np.where(ok, np.arange(n, dtype=np.int32)[None, :], np.int32(n))
    return np.minimum.reduceat(pos, seg_start, axis=1)


def _frame_chunks(gt_rows: np.ndarray, gt_frame: np.ndarray, det_rows: np.ndarray,
                  det_frame: np.ndarray, n_frames: int, max_pairs: int = 1 << 21):
    """Split rows (sorted by frame) into runs of whole frames with at most ~max_pairs pairs."""
    per = np.bincount(gt_frame, minlength=n_frames) * np.bincount(det_frame, minlength=n_frames)
    cum = np.cumsum(per)
    if len(cum) == 0 or cum[-1] <= max_pairs:
        yield gt_rows, det_rows
        return
    cuts = [0]
    while cuts[-1] < n_frames:
        base = cum[cuts[-1] - 1] if cuts[-1] else 0
        nxt = int(np.searchsorted(cum, base + max_pairs, side="right"))
        cuts.append(min(n_frames, max(nxt, cuts[-1] + 1)))
    for f0, f1 in zip(cuts[:-1], cuts[1:]):
        g0, g1 = np.searchsorted(gt_frame, [f0, f1])
        d0, d1 = np.searchsorted(det_frame, [f0, f1])
        yield gt_rows[g0:g1], det_rows[d0:d1]


def _greedy(edge_gt: np.ndarray, edge_det: np.ndarray, edge_frame: np.ndarray, n_det: int,
            avail: np.ndarray) -> np.ndarray:
    """Sequential greedy assignment of all frames and all thresholds at once.

    Edges must be sorted by (gt, priority): each ground truth, in order, takes its first
    available edge whose detection no earlier ground truth took (the devkit's loop).
    `avail` (T, E) says which edges pass score threshold T. A ground truth whose candidate
    detections are candidates of no other ground truth cannot interact with the rest: all of
    those are decided in one vectorized step. The others are processed one rank at a time (the
    k-th such ground truth of every frame together, frames being independent).
    Returns the chosen edge per (T, gt group) as a (T, G) array, -1 for none; groups are in
    order of their first edge.
    """
    n_t, n_e = avail.shape
    if n_e == 0:
        return np.full((n_t, 0), -1, dtype=np.int64)
    group_start = np.flatnonzero(np.r_[True, edge_gt[1:] != edge_gt[:-1]])
    n_g = len(group_start)
    group_id = np.repeat(np.arange(n_g), np.diff(np.r_[group_start, n_e]))
    chosen = np.full((n_t, n_g), -1, dtype=np.int64)
    # a detection shared by several ground truths makes all of them dependent
    shared_det = np.bincount(edge_det, minlength=n_det) > 1
    dep_group = np.zeros(n_g, dtype=bool)
    np.logical_or.at(dep_group, group_id, shared_det[edge_det])
    # -- independent ground truths: first available edge, no interaction
    ind_edges = np.flatnonzero(~dep_group[group_id])
    if len(ind_edges):
        gi = group_id[ind_edges]
        seg = np.flatnonzero(np.r_[True, gi[1:] != gi[:-1]])
        first = _first_per_segment(avail[:, ind_edges], seg, len(ind_edges))
        found = first < len(ind_edges)
        t_i, s_i = np.nonzero(found)
        chosen[t_i, gi[seg][s_i]] = ind_edges[first[t_i, s_i]]
    # -- dependent ground truths: rank by rank
    dep_groups = np.flatnonzero(dep_group)
    if len(dep_groups) == 0:
        return chosen
    g_frame = edge_frame[group_start[dep_groups]]
    new_frame = np.r_[True, g_frame[1:] != g_frame[:-1]]
    fstart = np.maximum.accumulate(np.where(new_frame, np.arange(len(dep_groups)), 0))
    rank = np.arange(len(dep_groups)) - fstart
    order = np.argsort(rank, kind="stable")
    rank_sorted = rank[order]
    bounds = np.flatnonzero(np.r_[True, rank_sorted[1:] != rank_sorted[:-1], True])
    group_end = np.r_[group_start[1:], n_e]
    taken = np.zeros((n_t, n_det), dtype=bool)
    for a, b in zip(bounds[:-1], bounds[1:]):
        groups = dep_groups[order[a:b]]
        gs, ge = group_start[groups], group_end[groups]
        lens = ge - gs
        seg = np.r_[0, np.cumsum(lens)[:-1]]
        idx = np.repeat(gs - seg, lens) + np.arange(int(lens.sum()))
        dets = edge_det[idx]
        first = _first_per_segment(avail[:, idx] & ~taken[:, dets], seg, len(idx))
        t_i, g_i = np.nonzero(first < len(idx))
        e_sel = idx[first[t_i, g_i]]
        chosen[t_i, groups[g_i]] = e_sel
        taken[t_i, edge_det[e_sel]] = True
    return chosen


def _get_thresholds(v: np.ndarray, n_gt: int) -> np.ndarray:
    """The devkit's getThresholds: scores closest to 41 linearly spaced recall values."""
    v = np.sort(v)[::-1]
    size = len(v)
    if size == 0:
        return v
    n = float(n_gt)
    i = np.arange(size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        l_rec = (i + 1.0) / n
        r_rec = np.r_[(i[:-1] + 2.0) / n, l_rec[-1:]]
    step = 1.0 / (N_SAMPLE_PTS - 1.0)
    cur = 0.0
    out = []
    start = 0
    while start < size:
        skip = (r_rec[start:] - cur) < (cur - l_rec[start:])
        skip[-1] = False  # the last score is always taken
        j = start + int(np.argmin(skip))
        out.append(v[j])
        cur += step
        start = j + 1
    if len(out) > N_SAMPLE_PTS:  # the devkit would write past its 41-entry array (never seen)
        out = out[:N_SAMPLE_PTS]
    return np.asarray(out, dtype=np.float64)


def _eval_class_difficulty(cls: str, diff: int, gt: KittiFlat, det: KittiFlat, pair_g: np.ndarray,
                           pair_d: np.ndarray, pair_iou: np.ndarray, det_dc_overlap: np.ndarray,
                           det_height_int: np.ndarray, gt_frame: np.ndarray):
    """One eval_class call: returns (precision[41], recall[41], thresholds, n_gt)."""
    minov = MIN_OVERLAP[cls]
    neigh = NEIGHBOUR.get(cls)
    # cleanData: ground truth
    g_is = gt.types == cls
    g_nb = (gt.types == neigh) if neigh else np.zeros(len(gt.types), dtype=bool)
    height = gt.boxes[:, 3] - gt.boxes[:, 1]
    ignore = ((gt.occluded > MAX_OCCLUSION[diff]) | (gt.truncated > MAX_TRUNCATION[diff])
              | (height <= MIN_HEIGHT[diff]))
    ign_gt = np.full(len(gt.types), -1, dtype=np.int8)
    ign_gt[g_nb | (g_is & ignore)] = 1
    ign_gt[g_is & ~ignore] = 0
    n_gt = int((ign_gt == 0).sum())
    # cleanData: detections
    ign_det = np.full(len(det.types), -1, dtype=np.int8)
    ign_det[det.types == cls] = 0
    ign_det[det_height_int < MIN_HEIGHT[diff]] = 1
    # candidate edges
    keep = (pair_iou > minov) & (ign_gt[pair_g] != -1) & (ign_det[pair_d] != -1)
    eg, ed, eo = pair_g[keep], pair_d[keep], pair_iou[keep]
    es = det.scores[ed]
    e_ign = ign_det[ed]
    # compact detection ids for the "taken" state
    udet, ed_local = np.unique(ed, return_inverse=True)
    ug = np.unique(eg)
    e_frame = gt_frame[eg]
    # gts without edges
    valid_no_edge = n_gt - int(np.isin(ug, np.flatnonzero(ign_gt == 0)).sum())

    # ---- pass 1 (recall thresholds): highest score, first detection on ties
    o1 = np.lexsort((ed, -es, eg))
    av1 = (es[o1] > _NO_DETECTION)[None, :]
    ch1 = _greedy(eg[o1], ed_local[o1], e_frame[o1], len(udet), av1)[0]
    grp_gt = eg[o1][np.flatnonzero(np.r_[True, eg[o1][1:] != eg[o1][:-1]])] if len(o1) else eg[:0]
    sel = ch1 >= 0
    e1 = o1[ch1[sel]]
    tp_mask = (ign_gt[grp_gt[sel]] == 0) & (e_ign[e1] == 0)
    v = es[e1][tp_mask]
    thresholds = _get_thresholds(v, n_gt)
    n_t = len(thresholds)

    precision = np.zeros(N_SAMPLE_PTS)
    recall = np.full(N_SAMPLE_PTS, np.nan)
    if n_t == 0:
        return precision, recall, thresholds, n_gt

    # ---- pass 2 (precision at each threshold): valid det of largest IoU (first on ties),
    # else the first ignored det
    prio_valid = np.where(e_ign == 0, 0, 1)
    key_ov = np.where(e_ign == 0, -eo, 0.0)
    o2 = np.lexsort((ed, key_ov, prio_valid, eg))
    av2 = es[o2][None, :] >= thresholds[:, None]
    ch2 = _greedy(eg[o2], ed_local[o2], e_frame[o2], len(udet), av2)
    g2 = grp_gt  # same group order (groups sorted by gt in both passes)
    found = ch2 >= 0
    e2 = o2[np.where(found, ch2, 0)]
    tp_tg = found & (ign_gt[g2][None, :] == 0) & (e_ign[e2] == 0)
    fn_tg = ~found & (ign_gt[g2][None, :] == 0)
    tp = tp_tg.sum(axis=1)
    fn = fn_tg.sum(axis=1) + valid_no_edge
    # false positives: valid dets over the threshold, not taken, not inside a DontCare
    elig = (ign_det == 0) & ~(det_dc_overlap > minov)
    s_elig = np.sort(det.scores[elig])
    n_over = len(s_elig) - np.searchsorted(s_elig, thresholds, side="left")
    taken = np.zeros((n_t, len(udet)), dtype=bool)
    t_i, g_i = np.nonzero(found)
    taken[t_i, ed_local[e2[t_i, g_i]]] = True
    elig_local = elig[udet]
    over_local = det.scores[udet][None, :] >= thresholds[:, None]
    fp = n_over - (taken & elig_local[None, :] & over_local).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        precision[:n_t] = tp / (tp + fp).astype(np.float64)
        recall[:n_t] = tp / (tp + fn).astype(np.float64)
    # running maximum from the right over the whole 41-array (devkit: max_element)
    interp = precision.copy()
    for i in range(n_t):
        interp[i] = _max_element(precision[i:])
    return interp, recall, thresholds, n_gt


def _max_element(a: np.ndarray) -> float:
    """std::max_element with operator< (a leading NaN wins; later NaNs never do)."""
    if math.isnan(a[0]):
        return float(a[0])
    finite = a[~np.isnan(a)]
    return float(finite.max())


def _ap(prec: np.ndarray, idx: Iterable[int], n: int) -> float:
    """Mean of the sampled precisions in percent, in the devkit's float32 arithmetic.

    saveAndPlotPlots accumulates into ``float sum`` and prints ``sum / n * 100`` (float), so
    this reproduces its printed digits, not just the value to ~1e-5.
    """
    s = np.float32(0.0)
    for i in idx:
        s = np.float32(float(s) + float(prec[i]))
    return float(np.float32(np.float32(s / np.float32(n)) * np.float32(100.0)))


def _evaluate_flat(gt: KittiFlat, det: KittiFlat, classes: Sequence[str]) -> KittiEvalResult:
    n_frames = len(gt.frame_ids)
    cls_lower = [c.lower() for c in classes]
    for c in cls_lower:
        if c not in MIN_OVERLAP:
            raise ValueError(f"class {c!r}: the devkit evaluates only Car, Pedestrian, Cyclist")
    gt_frame = gt.frame_of_rows()
    det_frame = det.frame_of_rows()
    # detections that can matter: of an evaluated class, or small (ignored_det == 1 for any type)
    det_height_int = np.trunc(np.abs(det.boxes[:, 1] - det.boxes[:, 3]))
    det_rel = np.isin(det.types, cls_lower) | (det_height_int < max(MIN_HEIGHT))
    # ground truth that can be matched: evaluated classes and their neighbours
    gt_types_rel = set(cls_lower) | {NEIGHBOUR[c] for c in cls_lower if c in NEIGHBOUR}
    gt_rel = np.isin(gt.types, list(gt_types_rel))
    gr = np.flatnonzero(gt_rel)
    dr = np.flatnonzero(det_rel)
    min_ov = min(MIN_OVERLAP[c] for c in cls_lower) if cls_lower else 1.0
    pg, pd, piou = [], [], []
    for g_rows, d_rows in _frame_chunks(gr, gt_frame[gr], dr, det_frame[dr], n_frames):
        a, b = _pairs(g_rows, gt_frame[g_rows], d_rows, det_frame[d_rows], n_frames)
        o = _overlaps(det.boxes[b], gt.boxes[a], -1)
        keep = o > min_ov
        pg.append(a[keep])
        pd.append(b[keep])
        piou.append(o[keep])
    pg, pd, piou = (np.concatenate(x) if x else np.zeros(0, dtype=t)
                    for x, t in ((pg, np.int64), (pd, np.int64), (piou, np.float64)))
    # DontCare: largest intersection-over-detection-area per detection
    dc = np.flatnonzero(gt.types == "dontcare")
    dcls = np.flatnonzero(np.isin(det.types, cls_lower))
    det_dc = np.zeros(len(det.types))
    if len(dc) and len(dcls):
        for g_rows, d_rows in _frame_chunks(dc, gt_frame[dc], dcls, det_frame[dcls], n_frames):
            qg, qd = _pairs(g_rows, gt_frame[g_rows], d_rows, det_frame[d_rows], n_frames)
            if len(qg):
                np.maximum.at(det_dc, qd, _overlaps(det.boxes[qd], gt.boxes[qg], 0))

    ap, prec_out, rec_out, thr_out, ngt_out, evaluated = {}, {}, {}, {}, {}, {}
    for c, cl in zip(classes, cls_lower):
        P = np.zeros((3, N_SAMPLE_PTS))
        R = np.full((3, N_SAMPLE_PTS), np.nan)
        T, N = [], []
        for d in range(3):
            P[d], R[d], th, n = _eval_class_difficulty(cl, d, gt, det, pg, pd, piou, det_dc,
                                                       det_height_int, gt_frame)
            T.append(th)
            N.append(n)
        ap[c] = {
            "R11": {DIFFICULTIES[d]: _ap(P[d], range(0, N_SAMPLE_PTS, 4), 11) for d in range(3)},
            "R40": {DIFFICULTIES[d]: _ap(P[d], range(1, N_SAMPLE_PTS), 40) for d in range(3)},
        }
        prec_out[c], rec_out[c], thr_out[c], ngt_out[c] = P, R, T, tuple(N)
        is_c = det.types == cl
        evaluated[c] = bool((det.boxes[is_c, 0] >= 0).any())
    names = det.raw_types if det.raw_types is not None else det.types
    unknown: dict[str, int] = {}
    if len(names):
        u, cnt = np.unique(names, return_counts=True)
        for name, k in zip(u, cnt):
            if str(name).lower() not in _KNOWN_TYPES:
                unknown[str(name)] = int(k)
    return KittiEvalResult(ap, prec_out, rec_out, thr_out, ngt_out, evaluated,
                           num_frames=n_frames, unknown_classes=unknown)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def evaluate_kitti(gt: Mapping[str, FrameLabels], dets: Mapping[str, FrameLabels],
                   classes: Sequence[str] = DEFAULT_CLASSES) -> KittiEvalResult:
    """KITTI 2D AP (devkit protocol) of `dets` against `gt`, both keyed by frame id.

    Frames are those of `gt`; a frame absent from `dets` has no detections; detections of frames
    not in `gt` are ignored. Boxes are x1 y1 x2 y2 in original image pixels.

    Raises:
        ValueError: nan / inf / -inf or a negative-size box in `dets`, scores missing, or an
            unknown class.
    """
    ids = list(gt.keys())
    g = _flat_from_frames(gt, ids, detections=False)
    d = _flat_from_frames(dets, ids, detections=True)
    res = _evaluate_flat(g, d, classes)
    res.missing_results = sum(1 for i in ids if i not in dets)
    return res


class EmptyResultsError(FileNotFoundError):
    """A result folder that does not exist or holds no result file for any evaluated frame."""


def _check_pred_dir(pred_dir: str | os.PathLike, allow_empty: bool) -> None:
    p = Path(pred_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"result folder {pred_dir} is a file, not a folder")
    if not allow_empty and not p.exists():
        raise EmptyResultsError(f"result folder {pred_dir} does not exist")


def _check_some_results(pred_dir, ids: Sequence[str], missing: Sequence[str], allow_empty: bool) -> None:
    if not allow_empty and ids and len(missing) == len(ids):
        raise EmptyResultsError(
            f"result folder {pred_dir} holds no result file for any of the {len(ids)} evaluated frames "
            f"(e.g. {ids[0]}.txt): nothing to score")


def evaluate_kitti_dirs(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                        ids: Sequence[str] | str | os.PathLike | None = None, strict: bool = False,
                        classes: Sequence[str] = DEFAULT_CLASSES, allow_empty: bool = False,
                        ) -> KittiEvalResult:
    """Evaluate a folder of result files (``%06d.txt``, 16 fields) like the devkit.

    Args:
        gt_dir: label_2 folder. pred_dir: result folder.
        ids: frame ids, or a split file (one id per line); default every label in `gt_dir`.
            A frame id listed twice is an error (it would count the frame twice).
        strict: a missing result file is an error (else: no detections, one warning with the count).
        allow_empty: accept a missing `pred_dir`, or one without a result file for any frame
            (every frame without detections: all AP 0); by default that is an error.

    Raises:
        EmptyResultsError (a FileNotFoundError): `pred_dir` missing or without any result file.
        ValueError: `pred_dir` is a file.
        FileNotFoundError: missing label files (always) or result files (strict), first few listed.
        KittiFormatError: a malformed line (file, line, field), nan / inf / -inf in any field,
            a file that is not UTF-8 text, a negative-size box in a result file, a frame id
            listed twice in a split file (file, line, id).
        ValueError: a frame id listed twice in `ids`.
    """
    ids = _resolve_ids(gt_dir, ids)
    _check_pred_dir(pred_dir, allow_empty)
    g, _ = read_kitti_dir(gt_dir, ids, results=False, strict=True)
    d, missing = read_kitti_dir(pred_dir, ids, results=True, strict=strict)
    _check_some_results(pred_dir, ids, missing, allow_empty)
    if missing:
        warnings.warn(f"{len(missing)} of {len(ids)} result files missing in {pred_dir} "
                      f"(counted as frames without detections), e.g. {missing[0]}.txt",
                      stacklevel=2)
    res = _evaluate_flat(g, d, classes)
    res.missing_results = len(missing)
    return res


def _resolve_ids(gt_dir, ids) -> list[str]:
    if ids is None:
        if not Path(gt_dir).is_dir():
            raise FileNotFoundError(f"ground-truth folder {gt_dir} does not exist")
        out = sorted(p[:-4] for p in os.listdir(gt_dir) if p.endswith(".txt"))
        if not out:
            raise KittiFormatError(f"no label files (*.txt) in {gt_dir}")
        return out
    if isinstance(ids, (str, os.PathLike)):
        return read_split(ids)  # refuses an id listed twice (it would count twice)
    out = [str(i) for i in ids]
    if not out:
        raise ValueError("empty list of frame ids")
    seen: set[str] = set()
    for k, fid in enumerate(out):
        if fid in seen:
            raise ValueError(f"frame id {fid!r} is listed twice in the frame ids (positions "
                             f"{out.index(fid)} and {k}): a frame may be evaluated only once")
        seen.add(fid)
    return out


def load_kitti_dirs(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                    ids: Sequence[str] | str | os.PathLike | None = None, strict: bool = False,
                    allow_empty: bool = False,
                    ) -> tuple[dict[str, FrameLabels], dict[str, FrameLabels]]:
    """Ground truth and detections as dicts of `FrameLabels` (e.g. for `evaluate_coco`); ids,
    `strict` and `allow_empty` as in `evaluate_kitti_dirs`."""
    ids = _resolve_ids(gt_dir, ids)
    _check_pred_dir(pred_dir, allow_empty)
    g, _ = read_kitti_dir(gt_dir, ids, results=False, strict=True)
    d, missing = read_kitti_dir(pred_dir, ids, results=True, strict=strict)
    _check_some_results(pred_dir, ids, missing, allow_empty)
    return g.to_frames(), d.to_frames()


# --------------------------------------------------------------------------------------------
# Where result files may be written
# --------------------------------------------------------------------------------------------
#: Marker file `mark_result_dir` writes into a folder of result files: only a folder holding it
#: counts as kd_bnn's own earlier output (a label_2 folder never does).
RESULT_MARKER = ".kd_bnn_results"
_RESULT_FILE = re.compile(r"[0-9]+\.txt")
_TEMP_FILE = re.compile(r"\..+\.tmp")  # kd_bnn.io.atomic_path's temporary files
_SUBDIRS = ("teacher",)  # kd_bnn.engine.evaluate writes the teacher's results to <out>/teacher


class ResultDirError(ValueError):
    """A folder that result files must not be written into."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_within(path: str | os.PathLike, protected: Iterable[tuple[str, str | os.PathLike]],
                     what: str) -> None:
    """Raise ResultDirError when `path` (resolved) is one of the `protected` folders
    ((description, folder) pairs) or inside one. `what` names `path` in the message."""
    p = Path(path).resolve()
    for desc, folder in protected:
        f = Path(folder).resolve()
        if _within(p, f):
            where = "is" if p == f else "is inside"
            raise ResultDirError(f"refusing to write {what} {path}: it {where} the {desc} {folder}")


def _foreign_entries(folder: Path, marked: bool, subdirs: Sequence[str]) -> list[str]:
    names = sorted(os.listdir(folder))
    marked = marked or (RESULT_MARKER in names and (folder / RESULT_MARKER).is_file())
    if not marked:
        return [n + ("/" if (folder / n).is_dir() else "") for n in names]
    bad = []
    for n in names:
        full = folder / n
        if full.is_symlink():
            bad.append(n)
        elif full.is_file() and (n == RESULT_MARKER or _RESULT_FILE.fullmatch(n) or _TEMP_FILE.fullmatch(n)):
            continue
        elif full.is_dir() and n in subdirs:
            bad += [f"{n}/{x}" for x in _foreign_entries(full, True, ())]
        else:
            bad.append(n + ("/" if full.is_dir() else ""))
    return bad


def check_result_dir(out: str | os.PathLike,
                     protected: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Refuse to write result files into `out` when that could destroy data.

    `out` (or its ``teacher`` subfolder) must not be one of the `protected` folders
    ((description, folder) pairs, e.g. the ground-truth label and image folders) nor inside one
    (paths compared resolved, so symlinks and ``..`` do not get round it). A missing or empty
    `out` is fine; a non-empty one must be kd_bnn's own earlier output: it holds the
    `RESULT_MARKER` file (`mark_result_dir`) and nothing but ``<id>.txt`` result files, the
    marker, leftover atomic-write temporaries and a ``teacher/`` subfolder of the same.

    Raises:
        ResultDirError (a ValueError) naming the folder and the first few offending entries.
    """
    out_p = Path(out)
    protected = list(protected)
    for sub in ("", *_SUBDIRS):
        target = out_p / sub if sub else out_p
        check_not_within(target, protected, "result files into" if not sub else f"{sub} result files into")
    if not out_p.exists():
        return
    if not out_p.is_dir():
        raise ResultDirError(f"refusing to write result files into {out}: it is not a folder")
    bad = _foreign_entries(out_p, False, _SUBDIRS)
    if bad:
        marked = (out_p / RESULT_MARKER).is_file()
        why = ("that kd_bnn does not write there" if marked else
               f"and no {RESULT_MARKER} marker: it is not the result folder of an earlier kd_bnn evaluation")
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ResultDirError(
            f"refusing to write result files into {out}: it holds {len(bad)} entr"
            f"{'y' if len(bad) == 1 else 'ies'} {why} ({shown}); choose a new or empty folder")


def mark_result_dir(out: str | os.PathLike) -> Path:
    """Create `out` if needed and write its `RESULT_MARKER` (see `check_result_dir`)."""
    from kd_bnn.io import atomic_write_text

    marker = Path(out) / RESULT_MARKER
    if not marker.is_file():
        atomic_write_text(marker, "KITTI result files written by kd_bnn (tools/eval.py); this folder may be "
                                  "overwritten by a later evaluation\n")
    return marker


# --------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------
def format_result_lines(boxes_xyxy, scores, labels, class_names: Sequence[str]) -> str:
    """Result-file text, 2D-only fields:
    ``type -1 -1 -10 x1 y1 x2 y2 -1 -1 -1 -1000 -1000 -1000 -10 score``."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"boxes/scores/labels lengths differ: {len(boxes)}, {len(scores)}, "
                         f"{len(labels)}")
    _check_det_values(boxes, scores, lambda k: f"detection {k}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"label out of range 0..{len(class_names) - 1}: found "
                         f"{labels.min()}..{labels.max()}")
    out = []
    for b, s, lab in zip(boxes, scores, labels):
        out.append(f"{class_names[lab]} -1 -1 -10 {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f} "
                   f"-1 -1 -1 -1000 -1000 -1000 -10 {s:.6f}\n")
    return "".join(out)


def write_kitti_results(out_dir: str | os.PathLike, image_id: str | int, detections_boxes_xyxy,
                        scores, labels, class_names: Sequence[str]) -> Path:
    """Write one frame's result file ``out_dir/<id>.txt`` atomically (an empty file if none)."""
    from kd_bnn.io import atomic_write_text

    fid = f"{image_id:06d}" if isinstance(image_id, (int, np.integer)) else str(image_id)
    path = Path(out_dir) / f"{fid}.txt"
    atomic_write_text(path, format_result_lines(detections_boxes_xyxy, scores, labels, class_names))
    return path


def detections_to_frame(det, class_names: Sequence[str], image_size: tuple[int, int]) -> FrameLabels:
    """`kd_bnn.models.detector.Detections` (boxes already in original pixels) -> `FrameLabels`.

    Boxes are clipped to the image (`image_size` = (height, width)); fields the 2D task does not
    use take the result-file placeholders (alpha -10, dims -1, location -1000, rotation -10).
    """
    h, w = image_size
    boxes = det.boxes.detach().cpu().double().numpy().reshape(-1, 4).copy()
    scores = det.scores.detach().cpu().double().numpy().reshape(-1)
    labels = det.labels.detach().cpu().numpy().reshape(-1).astype(np.int64)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    n = len(boxes)
    if n and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"label out of range 0..{len(class_names) - 1}")
    return FrameLabels(
        types=np.asarray([class_names[i] for i in labels], dtype=object),
        truncated=np.full(n, -1.0), occluded=np.full(n, -1, dtype=np.int64),
        alpha=np.full(n, -10.0), boxes=boxes, dims=np.full((n, 3), -1.0),
        loc=np.full((n, 3), -1000.0), rotation_y=np.full(n, -10.0), scores=scores,
    )


__all__ = [
    "EmptyResultsError", "KittiEvalResult", "KittiFlat", "MIN_OVERLAP", "N_SAMPLE_PTS", "NEIGHBOUR",
    "RESULT_MARKER", "ResultDirError", "check_not_within", "check_result_dir", "detections_to_frame",
    "evaluate_kitti", "evaluate_kitti_dirs", "format_result_lines", "load_kitti_dirs", "mark_result_dir",
    "read_kitti_dir", "write_kitti_results",
]
