"""What an annotator did last on one task and label: the boxes drawn and the last mask's logits.

Label Studio sends keypoints and rectangles in separate requests, so a box drawn earlier has to be
remembered to be combined with later clicks; the previous low-resolution logits feed SAM's mask
prompt when more points are added to the same object, as SAM's paper does for iterative clicks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from backend.cache.store import ByteStore

Box = tuple[float, float, float, float]
Point = tuple[float, float, int]  # x, y, label


@dataclass
class Session:
    boxes: list[Box] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)  # the points that produced `mask_logits`
    box: Box | None = None  # the box that produced `mask_logits`
    mask_logits: np.ndarray | None = None  # (256, 256) float16


class SessionStore:
    """Sessions keyed by model, image content, task and label, kept for `ttl_s`."""

    def __init__(self, store: ByteStore, model_identity: str, ttl_s: int) -> None:
        self.store = store
        self.model_identity = model_identity
        self.ttl_s = ttl_s

    def _key(self, image_digest: str, task_id: object, label: str) -> str:
        # Task id and label come from the request: hashed, any JSON value (a lone surrogate, a huge
        # string) gives a valid key of bounded length.
        owner = hashlib.sha256(json.dumps([task_id, label]).encode()).hexdigest()[:32]
        return f"sam:session:{self.model_identity}:{image_digest}:{owner}"

    def load(self, image_digest: str, task_id: object, label: str) -> Session:
        data = self.store.get(self._key(image_digest, task_id, label))
        if data is None:
            return Session()
        header_bytes, _, payload = data.partition(b"\n")
        header = json.loads(header_bytes)
        logits = None
        if payload:
            logits = np.frombuffer(payload, dtype=np.float16).reshape(header["logits_shape"])
        return Session(
            boxes=[tuple(box) for box in header["boxes"]],
            points=[tuple(point) for point in header["points"]],
            box=tuple(header["box"]) if header["box"] else None,
            mask_logits=logits,
        )

    def save(self, image_digest: str, task_id: object, label: str, session: Session) -> None:
        payload = b""
        header: dict = {"boxes": session.boxes, "points": session.points, "box": session.box}
        if session.mask_logits is not None:
            logits = np.ascontiguousarray(session.mask_logits, dtype=np.float16)
            header["logits_shape"] = list(logits.shape)
            payload = logits.tobytes()
        self.store.set(
            self._key(image_digest, task_id, label), json.dumps(header).encode() + b"\n" + payload, self.ttl_s
        )
