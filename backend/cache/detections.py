"""GroundingDINO's boxes for an image, cached next to its SAM embedding, so that a pre-annotation batch cut
short by its deadline is not detected again when Label Studio retries it.

Keyed by image content, the detector's identity, and everything else the boxes depend on: the caption and its
phrase spans and label groups, both thresholds and the number of objects kept. Value: a JSON list of
[x0, y0, x1, y1, score, phrase], a few hundred bytes; a detector that segments (SAM 3) adds each box's mask as
[height, width, base64 of its zlib-compressed bits], a few kilobytes an object.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib

import numpy as np

from backend.cache.store import ByteStore
from backend.models.detector import Detection


class DetectionCache:
    def __init__(self, store: ByteStore, ttl_s: int) -> None:
        self.store = store
        self.ttl_s = ttl_s

    @staticmethod
    def query_key(detector_identity: str, asked: list) -> str:
        """What every key of one detector and one query starts with; `asked` is everything else the boxes depend
        on (caption, phrase spans, label groups, thresholds, objects kept), as JSON-able values."""
        digest = hashlib.sha256(json.dumps(asked).encode()).hexdigest()[:24]
        return f"sam:det:{detector_identity}:{digest}"

    def get(self, query_key: str, image_digest: str) -> list[Detection] | None:
        data = self.store.get(f"{query_key}:{image_digest}")
        if data is None:
            return None
        return [
            Detection((x0, y0, x1, y1), score, phrase, unpacked_mask(*mask) if mask else None)
            for x0, y0, x1, y1, score, phrase, *mask in json.loads(data)
        ]

    def put(self, query_key: str, image_digest: str, detections: list[Detection]) -> None:
        rows = [
            [*detection.box, detection.score, detection.phrase, *packed_mask(detection.mask)]
            for detection in detections
        ]
        self.store.set(f"{query_key}:{image_digest}", json.dumps(rows).encode(), self.ttl_s)


def packed_mask(mask: np.ndarray | None) -> list:
    """[height, width, text] for a mask (none for no mask): its bits, compressed, in base64."""
    if mask is None:
        return []
    bits = zlib.compress(np.packbits(mask).tobytes(), level=1)
    return [mask.shape[0], mask.shape[1], base64.b64encode(bits).decode()]


def unpacked_mask(height: int, width: int, text: str) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)
