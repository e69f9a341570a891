"""The detectors' precision and recall of `python -m backend evaluate`: box matching checked against hand-computed
cases."""

from __future__ import annotations

from backend.training.detection_scores import DetectorReport, box_iou, match_boxes

CAR = (0.0, 0.0, 10.0, 10.0)
DOG = (20.0, 20.0, 30.0, 40.0)


def test_box_iou_is_hand_computed():
    assert box_iou(CAR, CAR) == 1.0
    assert box_iou(CAR, (5.0, 0.0, 15.0, 10.0)) == 50 / 150
    assert box_iou(CAR, DOG) == 0.0


def test_a_perfect_detector_scores_precision_and_recall_one():
    report = DetectorReport("d")
    report.add(match_boxes([("car", CAR), ("dog", DOG)], [("car", CAR, 0.9), ("dog", (20.0, 21.0, 30.0, 40.0), 0.8)]))
    scores = report.as_dict()
    assert scores["overall"]["precision"] == scores["overall"]["recall"] == 1.0
    assert scores["labels"]["dog"] == {
        "precision": 1.0,
        "recall": 1.0,
        "true_positives": 1,
        "false_positives": 0,
        "missed": 0,
    }


def test_nothing_found_is_recall_zero_and_no_precision():
    counts = match_boxes([("car", CAR)], []).get("car")
    assert counts is not None and counts.as_dict()["recall"] == 0.0 and counts.as_dict()["precision"] is None


def test_a_wrong_label_is_a_false_positive_and_a_miss():
    counts = match_boxes([("car", CAR)], [("dog", CAR, 0.9)])
    assert counts["dog"].as_dict()["precision"] == 0.0 and counts["dog"].false_positives == 1
    assert counts["car"].missed == 1 and counts["car"].as_dict()["recall"] == 0.0


def test_a_box_below_half_overlap_and_a_second_box_of_one_object_are_false_positives():
    shifted = (5.0, 0.0, 15.0, 10.0)  # IoU 1/3 with CAR
    counts = match_boxes([("car", CAR)], [("car", shifted, 0.9)])["car"]
    assert (counts.true_positives, counts.false_positives, counts.missed) == (0, 1, 1)
    # Two detections of one car: one takes it, the other is a false positive.
    report = DetectorReport("d")
    report.add(match_boxes([("car", CAR)], [("car", (0.0, 0.0, 10.0, 9.0), 0.5), ("car", CAR, 0.7)]))
    report.add(match_boxes([("car", DOG)], []))
    overall = report.as_dict()["overall"]
    assert overall == {"precision": 0.5, "recall": 0.5, "true_positives": 1, "false_positives": 1, "missed": 1}
