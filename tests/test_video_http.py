"""Video tasks through the HTTP API, replaying what Label Studio 1.23.2 sent for a video project
(tests/fixtures/ls-protocol/20-video-*.json): keyframes from the task's saved annotation or the request's context,
tracked with the reduced SAM 2.1 video predictor, answered as VideoRectangle results."""

from __future__ import annotations

import pytest
import torch

from backend.protocol.video import video_objects
from tests.assets import recorded
from tests.conftest import RECORDED_VIDEO_FRAMES as FRAMES
from tests.conftest import rounded, video_web_tier


@pytest.fixture
def video_client(client_with):
    return client_with()


def sure_of_presence(predictor) -> None:
    """Random weights put the object score near one half; a raised bias makes the tracker keep its masks."""
    tracker = predictor.video.tracker.get(60)
    with torch.no_grad():
        tracker.model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)


def batch_with_saved_annotation() -> dict:
    """Retrieve predictions on the recorded video task, once the recorded annotation (keyframes on frames 1 and 20,
    and a disabled one on 40) is saved on it."""
    body = recorded("20-video-predict-batch.json")
    annotation = recorded("20-video-webhook-annotation-created.json")
    body["tasks"][0]["annotations"] = [annotation["annotation"]]
    return body


def test_the_recorded_video_setup_is_accepted(video_client):
    client, _ = video_client
    setup = recorded("20-video-setup.json")
    response = client.post("/setup", json=setup)
    assert response.status_code == 200, response.json
    # The video predictor's version (not the image segmenter's): another VIDEO_MODEL is another version.
    assert response.json["model_version"] == "video-sam2.1-hiera-tiny@sam2.1-hiera-tiny-video"


def test_a_video_config_without_video_rectangles_is_refused_at_setup(video_client):
    client, _ = video_client
    schema = (
        '<View><Video name="video" value="$video"/><Labels name="l" toName="video"><Label value="Car"/></Labels></View>'
    )
    response = client.post("/setup", json={"project": "1.1", "schema": schema})
    assert response.status_code == 422
    assert "no VideoRectangle control" in response.json["error"]


def test_retrieve_predictions_tracks_the_saved_keyframes(video_client):
    client, predictor = video_client
    sure_of_presence(predictor)
    body = batch_with_saved_annotation()
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    (track,) = entry["result"]
    drawn = body["tasks"][0]["annotations"][0]["result"][0]
    assert (track["id"], track["from_name"], track["to_name"], track["type"]) == (
        drawn["id"],
        "box",
        "video",
        "videorectangle",
    )
    assert track["value"]["labels"] == ["Car"]
    assert track["value"]["framesCount"] == FRAMES
    assert track["value"]["duration"] == pytest.approx(FRAMES / 25)
    sequence = {item["frame"]: item for item in track["value"]["sequence"]}
    # The annotator's keyframes come back exactly as drawn.
    for keyframe in drawn["value"]["sequence"]:
        assert sequence[keyframe["frame"]] == keyframe
    assert len(sequence) > len(drawn["value"]["sequence"])  # and tracked boxes between them
    # As Label Studio's editor reads it back: the car shown on frames 1-40, and not after 40, where the annotator
    # marked it gone.
    (read_back,) = video_objects(entry["result"])
    assert read_back.region_id == drawn["id"] and read_back.labels == ("Car",)
    assert all(read_back.shown_at(frame) is not None for frame in range(1, 41))
    assert all(read_back.shown_at(frame) is None for frame in range(41, FRAMES + 1))
    assert 0 < entry["score"] <= 1
    assert entry["model_version"] == "video-sam2.1-hiera-tiny@sam2.1-hiera-tiny-video"


def test_the_recorded_interactive_context_is_tracked(video_client):
    client, _ = video_client
    body = recorded("20-video-predict-interactive.json")
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    regions = body["params"]["context"]["result"]
    assert [track["id"] for track in entry["result"]] == [region["id"] for region in regions]


def test_a_video_task_with_nothing_drawn_needs_the_detector_for_its_labels(video_client):
    """Nothing drawn in a project with labels: they are detected (tests/test_video_zero_click.py), here by a detector
    whose weights are absent, which is said before the video is downloaded."""
    client, _ = video_client
    body = recorded("20-video-predict-batch.json")
    body["tasks"][0]["data"]["video"] = "/data/upload/1/absent.mp4"  # a download would answer 404
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert "need the detector (DETECTOR=groundingdino-py)" in response.json["error"]


def test_too_many_objects_are_refused_before_the_video_is_downloaded(client_with):
    client, _ = client_with(max_video_objects=1)
    body = batch_with_saved_annotation()
    region = body["tasks"][0]["annotations"][0]["result"][0]
    body["tasks"][0]["annotations"][0]["result"].append({**region, "id": "second"})
    body["tasks"][0]["data"]["video"] = "/data/upload/1/absent.mp4"  # a download would answer 404
    response = client.post("/predict", json=body)
    assert response.status_code == 413
    assert "MAX_VIDEO_OBJECTS allows 1" in response.json["error"]


def test_a_video_longer_than_the_cap_is_refused(client_with):
    client, _ = client_with(max_video_frames=10)
    response = client.post("/predict", json=batch_with_saved_annotation())
    assert response.status_code == 413
    assert f"the video has {FRAMES} frames, more than MAX_VIDEO_FRAMES=10" in response.json["error"]


def test_a_video_larger_than_the_byte_cap_is_refused(client_with, recorded_video):
    client, _ = client_with(max_video_bytes=1000)
    assert recorded_video.path.stat().st_size > 1000
    response = client.post("/predict", json=batch_with_saved_annotation())
    assert response.status_code == 413
    assert "larger than MAX_VIDEO_BYTES (1000)" in response.json["error"]


def test_queue_mode_tracks_on_a_worker_as_this_process_does(
    video_client, settings, queue_redis, workers, video_folder, label_studio
):
    """The web tier (no model) enqueues the track on the pre-annotation queue; the worker downloads the video from
    Label Studio itself and answers what the in-process tracker answers."""
    body = recorded("20-video-predict-interactive.json")
    local_client, _ = video_client
    local = local_client.post("/predict", json=body)
    assert local.status_code == 200, local.json
    web = video_web_tier(settings, queue_redis.url, video_folder)
    workers.start(
        1,
        VIDEO_CHECKPOINT=str(video_folder),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
        JOB_TIMEOUT="300",
    )
    queued = web.post("/predict", json=body)
    assert queued.status_code == 200, queued.json
    assert rounded(queued.json["results"]) == rounded(local.json["results"])


def test_a_track_past_the_deadline_says_what_would_make_it_fit(client_with):
    """A request that names no project has no tracking run to go on in (tests/test_video_runs.py): the error names
    what would make the track fit."""
    client, _ = client_with(predict_deadline_s=0.001)
    body = batch_with_saved_annotation()
    del body["project"]
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert f"through the video's {FRAMES} frames takes longer than PREDICT_DEADLINE" in response.json["error"]
