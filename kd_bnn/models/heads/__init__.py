"""Anchor-based YOLO heads: decoding, losses and NMS shared by the Darknet and MobileNet models."""

from kd_bnn.models.heads.common import (
    AnchorHead,
    AnchorHeadsMixin,
    decode_heads,
    heads_loss,
    postprocess,
    predict_heads,
)
from kd_bnn.models.heads.yolov2 import RegionHead
from kd_bnn.models.heads.yolov3 import YoloHead

__all__ = ["AnchorHead", "AnchorHeadsMixin", "RegionHead", "YoloHead", "decode_heads", "heads_loss", "postprocess", "predict_heads"]
