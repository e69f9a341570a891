"""A project's training set: the brush masks and polygons (rasterised) of its annotations, kept on disk one file per
annotation.

One file per annotation id makes ANNOTATION_UPDATED a replace and ANNOTATIONS_DELETED (which carries
only ids) a removal. Masks are stored bit-packed and compressed, so a 1024×768 mask takes a few KiB, and are held
bit-packed in memory too (an eighth of a byte per pixel) until a mask is used. What an annotation's masks may declare
is checked before any is decoded (`MaskLimits`). Regions that cannot be learnt from are not stored; each is logged
and listed in rejections.jsonl.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.config import Settings
from backend.errors import Rejected, RleError
from backend.project_files import ProjectFiles, fsync_directory, write_atomically
from backend.protocol.brush_rle import decode_mask
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import Control, ProjectConfig
from backend.protocol.polygons import rasterise

log = logging.getLogger(__name__)


@dataclass
class Region:
    region_id: str
    label: str
    bits: np.ndarray  # the (H, W) mask bit-packed (np.packbits, row-major)
    shape: tuple[int, int]

    @classmethod
    def of_mask(cls, region_id: str, label: str, mask: np.ndarray) -> Region:
        height, width = mask.shape
        return cls(region_id, label, np.packbits(mask, axis=None), (height, width))

    @property
    def mask(self) -> np.ndarray:
        """The (H, W) bool mask, unpacked now: a byte per pixel for as long as the caller holds it."""
        height, width = self.shape
        return np.unpackbits(self.bits, count=height * width).reshape(height, width).view(bool)


@dataclass(frozen=True)
class MaskLimits:
    """What one annotation's masks may declare, checked before anything is allocated for them."""

    image_pixels: int  # MAX_IMAGE_PIXELS, per region
    regions: int  # TRAIN_MAX_REGIONS
    annotation_pixels: int  # TRAIN_MAX_ANNOTATION_PIXELS, all its regions together

    @classmethod
    def of(cls, settings: Settings) -> MaskLimits:
        return cls(settings.max_image_pixels, settings.train_max_regions, settings.train_max_annotation_pixels)


@dataclass
class AnnotationRecord:
    annotation_id: int
    task_id: int
    image_url: str
    regions: list[Region]
    image_digest: str | None = None  # set once the image was fetched and the masks' size checked against it


def _label_studio_id(value: object, what: str) -> int:
    if not is_label_studio_id(value):
        raise Rejected(f"{what} must be a Label Studio id (a positive 64-bit integer)")
    return value


def _pixels(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Rejected(f"{what} must be a positive number of pixels")
    return value


def _label(result: dict, control: Control | None, kind: str) -> str:
    """The region's label, checked against the control of its kind ("brush" or "polygon")."""
    tag = f"{kind.capitalize()}Labels"
    if control is None:
        raise Rejected(f"the label config has no {tag} control")
    if result.get("from_name") != control.name:
        raise Rejected(f"region from control {result.get('from_name')!r}, not the {tag} {control.name!r}")
    value = result.get("value")
    if not isinstance(value, dict):
        raise Rejected("the region's value is not an object")
    labels = value.get(f"{kind}labels")
    labels = labels if isinstance(labels, list) else []
    if not labels or labels[0] not in control.labels:
        raise Rejected(
            f"label {labels[0] if labels else None!r} is not in the label config ({', '.join(control.labels)})"
        )
    return labels[0]


def _declared_pixels(result: dict, limits: MaskLimits) -> int:
    """width × height a region declares; 0 where it declares no size that would be decoded (it is refused alone)."""
    try:
        height, width = _image_size(result, limits.image_pixels)
    except Rejected:
        return 0
    return width * height


def _check_limits(mask_results: list[dict], limits: MaskLimits) -> None:
    if len(mask_results) > limits.regions:
        raise Rejected(
            f"the annotation has {len(mask_results)} mask regions, over TRAIN_MAX_REGIONS ({limits.regions});"
            " none of them was decoded"
        )
    declared = sum(_declared_pixels(result, limits) for result in mask_results)
    if declared > limits.annotation_pixels:
        raise Rejected(
            f"the annotation's {len(mask_results)} mask regions declare {declared} pixels in all, over"
            f" TRAIN_MAX_ANNOTATION_PIXELS ({limits.annotation_pixels}); none of them was decoded"
        )


def _image_size(result: dict, max_pixels: int) -> tuple[int, int]:
    """(height, width) the region declares. A mask is allocated at this size, so it is checked first."""
    width = _pixels(result.get("original_width"), "original_width")
    height = _pixels(result.get("original_height"), "original_height")
    if width * height > max_pixels:
        raise Rejected(
            f"original_width x original_height is {width}x{height} = {width * height} pixels,"
            f" over MAX_IMAGE_PIXELS ({max_pixels})"
        )
    return height, width


def _nonempty(result: dict, label: str, mask: np.ndarray) -> Region:
    if not mask.any():
        raise Rejected("the mask is empty")
    return Region.of_mask(str(result.get("id") or ""), label, mask)


def _brush_region(result: dict, config: ProjectConfig, max_pixels: int) -> Region:
    label = _label(result, config.brush, "brush")
    value = result["value"]  # an object: _label checked it
    if value.get("format") != "rle":
        raise Rejected(f"brush format {value.get('format')!r} is not 'rle'")
    # Decoding allocates what the size declares (four bytes a pixel); decode_mask checks the RLE's own declared
    # length against it.
    height, width = _image_size(result, max_pixels)
    rle = value.get("rle")
    if not isinstance(rle, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 256 for x in rle
    ):
        raise Rejected("rle is not a list of byte values")
    try:
        mask = decode_mask(rle, height, width)
    except RleError as error:
        raise Rejected(f"rle does not decode: {error}") from error
    return _nonempty(result, label, mask)


def _is_point(point: object) -> bool:
    """[x, y] in percent, within the image; Label Studio keeps polygons inside it (slack for rounding)."""
    return (
        isinstance(point, list)
        and len(point) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) and -0.5 <= x <= 100.5 for x in point)
    )


def _polygon_region(result: dict, config: ProjectConfig, max_pixels: int) -> Region:
    """A polygon rasterised at the size the image is shown (the pixels whose centre it covers), as a brush is."""
    label = _label(result, config.polygon, "polygon")
    height, width = _image_size(result, max_pixels)
    points = result["value"].get("points")  # value is an object: _label checked it
    if not isinstance(points, list) or len(points) < 3 or not all(_is_point(point) for point in points):
        raise Rejected("points is not a list of three or more [x, y] pairs in percent of the image (0-100)")
    return _nonempty(result, label, rasterise(points, (height, width)))


REGION_READERS = {"brushlabels": _brush_region, "polygonlabels": _polygon_region}


def record_from_webhook(
    annotation: dict, task: dict, config: ProjectConfig, limits: MaskLimits
) -> tuple[AnnotationRecord, list[tuple[str, str]]]:
    """The brush and polygon regions of an ANNOTATION_CREATED/UPDATED payload and, for each region left out, (id,
    reason); a region declaring more than `limits.image_pixels` pixels is left out undecoded. Raises Rejected when the
    annotation as a whole is unusable, or declares more regions or pixels than `limits` allow."""
    annotation_id = _label_studio_id(annotation.get("id"), "annotation.id")
    task_id = _label_studio_id(task.get("id"), "task.id")
    image_url = (task.get("data") or {}).get(config.image_field)
    if not isinstance(image_url, str) or not image_url:
        raise Rejected(f"task {task_id} has no image in data.{config.image_field}")
    record = AnnotationRecord(annotation_id, task_id, image_url, [])
    if annotation.get("was_cancelled"):
        return record, [("*", "the annotation was cancelled (task skipped)")]
    results = annotation.get("result")
    # Keypoints, rectangles, text: not masks to learn from.
    mask_results = [
        result
        for result in (results if isinstance(results, list) else [])
        if isinstance(result, dict) and str(result.get("type")) in REGION_READERS
    ]
    _check_limits(mask_results, limits)
    left_out = []
    for result in mask_results:
        try:
            record.regions.append(REGION_READERS[str(result.get("type"))](result, config, limits.image_pixels))
        except Rejected as reason:
            left_out.append((str(result.get("id")), str(reason)))
    return record, left_out


class TrainingSet:
    """The stored annotations of one project."""

    def __init__(self, files: ProjectFiles) -> None:
        self.files = files

    def _path(self, annotation_id: int) -> Path:
        return self.files.annotations / f"{annotation_id}.npz"

    def put(self, record: AnnotationRecord) -> None:
        """Store (or replace) an annotation; one without regions is removed instead."""
        if not record.regions:
            self.drop(record.annotation_id)
            return
        meta = {
            "annotation_id": record.annotation_id,
            "task_id": record.task_id,
            "image_url": record.image_url,
            "image_digest": record.image_digest,
            "regions": [{"id": r.region_id, "label": r.label, "shape": list(r.shape)} for r in record.regions],
        }
        arrays = {f"mask{i}": region.bits for i, region in enumerate(record.regions)}
        buffer = io.BytesIO()
        meta_array = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        # mypy reads **arrays as possibly numpy's `allow_pickle: bool` keyword; its keys are all mask{i}.
        np.savez_compressed(buffer, meta=meta_array, **arrays)  # type: ignore[arg-type]
        write_atomically(self._path(record.annotation_id), buffer.getvalue())

    def drop(self, annotation_id: int) -> bool:
        path = self._path(annotation_id)
        if not path.exists():
            return False
        path.unlink()
        fsync_directory(path.parent)
        return True

    def _load(self, path: Path) -> AnnotationRecord:
        with np.load(path) as stored:
            meta = json.loads(stored["meta"].tobytes())
            regions = []
            for i, region in enumerate(meta["regions"]):
                height, width = region["shape"]
                bits = stored[f"mask{i}"]
                if bits.dtype != np.uint8 or bits.size != -(-height * width // 8):
                    raise ValueError(f"mask{i} holds {bits.size} bytes, not the bits of a {width}x{height} mask")
                regions.append(Region(region["id"], region["label"], bits, (height, width)))
        return AnnotationRecord(
            meta["annotation_id"], meta["task_id"], meta["image_url"], regions, meta["image_digest"]
        )

    def _paths(self) -> list[Path]:
        if not self.files.annotations.is_dir():
            return []
        return sorted(self.files.annotations.glob("*.npz"), key=lambda path: int(path.stem))

    def records(self) -> Iterator[AnnotationRecord]:
        """Every stored annotation, in id order; an unreadable file is logged and skipped."""
        for path in self._paths():
            try:
                yield self._load(path)
            except (OSError, ValueError, KeyError) as error:
                log.error("project %d: training file %s is unreadable, skipped: %s", self.files.project_id, path, error)

    def summary(self) -> dict:
        """Counts from each file's header only: the masks are not decoded."""
        metas = []
        for path in self._paths():
            try:
                with np.load(path) as stored:
                    metas.append(json.loads(stored["meta"].tobytes()))
            except (OSError, ValueError, KeyError):
                continue  # reported when training reads it
        return {
            "annotations": len(metas),
            "masks": sum(len(meta["regions"]) for meta in metas),
            "tasks": len({meta["task_id"] for meta in metas}),
        }

    def reject(self, annotation_id: object, task_id: object, reasons: list[tuple[str, str]]) -> None:
        """Log and keep the reasons regions were not taken, so none goes missing unexplained."""
        for region_id, reason in reasons:
            log.warning(
                "project %d annotation %s region %s not used for training: %s",
                self.files.project_id,
                annotation_id,
                region_id,
                reason,
            )
        self.files.root.mkdir(parents=True, exist_ok=True)
        with open(self.files.rejections, "a") as handle:
            for region_id, reason in reasons:
                entry = {"time": time.time(), "annotation": annotation_id, "task": task_id, "region": region_id}
                handle.write(json.dumps({**entry, "reason": reason}) + "\n")

    def rejections(self) -> list[dict]:
        if not self.files.rejections.exists():
            return []
        return [json.loads(line) for line in self.files.rejections.read_text().splitlines() if line.strip()]
