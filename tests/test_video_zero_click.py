"""Zero-click video pre-annotation: a video task with nothing drawn gets the project's labels detected on every
VIDEO_DETECT_EVERY-th frame, linked into one chain per object (backend.prompts.video_chains) and each chain tracked
from its detections. The linking rule on hand-made detections; then the whole path through /predict with a reduced
GroundingDINO (transformers) and the reduced SAM 2.1 video predictor, random weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from backend.prompts.text import phrases_query
from backend.prompts.video_chains import LINK_IOU, MAX_MISSED, FrameDetection, link_detections, strongest
from backend.protocol.label_config import parse_video_config
from backend.protocol.video import VideoBox, video_objects
from backend.videos import VideoFile, VideoLimits
from tests.assets import recorded
from tests.conftest import make_client, rounded, video_web_tier
from tests.detector_weights import write_detector
from tests.synthetic_video import write_frames, write_moving_shapes
from tests.test_video_runs import ended

EVERY = 5  # frames between detection passes in these tests


def moving(label: str, frames: range, x0: float, step: float, score: float = 0.5) -> list[FrameDetection]:
    """An object's detections on `frames`, moving right `step` pixels a frame from x0."""
    return [
        FrameDetection(frame, (x0 + step * frame, 10.0, x0 + step * frame + 20.0, 30.0), score, label)
        for frame in frames
    ]


def by_frame(*objects: list[FrameDetection], frames: range) -> list[list[FrameDetection]]:
    return [[d for detections in objects for d in detections if d.frame == frame] for frame in frames]


def test_a_moving_objects_detections_form_one_chain():
    # 2 pixels a frame, detections 5 frames apart: a 20-pixel box moves 10 pixels between them, and overlaps its
    # previous box by 10/30, above LINK_IOU; from its second box on, the chain predicts it exactly (constant motion).
    frames = range(0, 40, EVERY)
    car = moving("Car", frames, 0.0, 2.0)
    assert 10 / 30 >= LINK_IOU
    (chain,) = link_detections(by_frame(car, frames=frames))
    assert chain.detections == car and chain.label == "Car"
    assert chain.predicted(40) == pytest.approx(moving("Car", range(40, 41), 0.0, 2.0)[0].box)


def test_the_chains_motion_links_what_its_last_box_alone_would_not():
    # 3 pixels a frame, then 15 pixels between detections: 5/35 of overlap with the last box, under LINK_IOU, but
    # the velocity of the chain's last two boxes (here 0 and 5, linked at one frame apart) predicts the next.
    car = moving("Car", range(0, 1), 0.0, 3.0) + moving("Car", range(1, 40, EVERY), 0.0, 3.0)
    assert 5 / 35 < LINK_IOU
    (chain,) = link_detections([[detection] for detection in car])
    assert chain.detections == car


def test_two_objects_make_two_chains_and_labels_never_mix():
    frames = range(0, 30, EVERY)
    left = moving("Car", frames, 0.0, 1.0)
    right = moving("Car", frames, 200.0, -1.0)
    # A person on the very box of the left car: the same place, another label, another object.
    person = [replace(detection, label="Person") for detection in left]
    chains = link_detections(by_frame(left, right, person, frames=frames))
    assert sorted((chain.label, chain.detections[0].box[0]) for chain in chains) == [
        ("Car", 0.0),
        ("Car", 200.0),
        ("Person", 0.0),
    ]
    for chain in chains:
        assert len(chain.detections) == len(frames)
        assert {detection.label for detection in chain.detections} == {chain.label}


def test_a_gap_ends_a_chain():
    frames = range(0, 60, EVERY)
    missed_once = [d for d in moving("Car", frames, 0.0, 1.0) if d.frame != 20]
    (chain,) = link_detections(by_frame(missed_once, frames=frames))
    assert len(chain.detections) == len(frames) - 1  # missed on one detection frame: still one object
    gone = [d for d in moving("Car", frames, 0.0, 1.0) if not 20 <= d.frame < 20 + MAX_MISSED * EVERY]
    first, second = link_detections(by_frame(gone, frames=frames))
    assert first.detections[-1].frame < 20 <= 20 + MAX_MISSED * EVERY <= second.detections[0].frame


def test_the_cap_keeps_the_strongest_chains_in_their_order():
    frames = range(0, 20, EVERY)
    weak = moving("Car", frames, 0.0, 1.0, score=0.2)
    strong = moving("Car", frames, 100.0, 1.0, score=0.9)
    short = moving("Person", range(0, 5, EVERY), 300.0, 1.0, score=0.95)
    chains = link_detections(by_frame(weak, strong, short, frames=frames))
    assert [chain.strength for chain in strongest(chains, 2)] == pytest.approx([0.9 * 4, 0.95])
    assert strongest(chains, 5) == chains


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory):
    return write_detector(tmp_path_factory.mktemp("detector") / "grounding-dino", "grounding-dino")


VIDEO_URL = "/data/upload/1/zero-click.mp4"  # two shapes moving
STILL_URL = "/data/upload/1/zero-click-still.mp4"  # the same two shapes, standing still
FRAMES, HEIGHT, WIDTH = 16, 48, 64


@pytest.fixture(scope="module")
def clips(media_root) -> dict[str, Path]:
    """Each test video's URL and file: on a still video a random-weight detector finds the same boxes on every
    detection frame, so they link into chains of several detections; on the moving one they rarely do."""
    paths = {url: media_root / url.removeprefix("/data/") for url in (VIDEO_URL, STILL_URL)}
    paths[VIDEO_URL].parent.mkdir(parents=True, exist_ok=True)
    write_moving_shapes(paths[VIDEO_URL], frames=FRAMES, height=HEIGHT, width=WIDTH)
    (_, first), *_ = VideoFile.open(paths[VIDEO_URL], VideoLimits(FRAMES, HEIGHT * WIDTH)).frames(0, 1)
    write_frames(paths[STILL_URL], [first] * FRAMES)
    return paths


@pytest.fixture
def zero_click_with(settings, redis_url, video_folder, detector_folder, clips):
    """A client with the reduced detector and video predictor, and `overrides`; random weights score every box low,
    so the thresholds are lowered to let boxes through (the selection itself is the images' own)."""

    def make(**overrides):
        chosen = replace(
            settings,
            redis_url=redis_url,
            video_checkpoint=str(video_folder),
            detector="grounding-dino",
            detector_model=str(detector_folder),
            grounding_dino_image_size=64,
            box_threshold=0.0,
            text_threshold=0.0,
            max_objects=2,
            max_video_objects=3,
            video_detect_every=EVERY,
            **overrides,
        )
        return make_client(chosen)

    return make


@pytest.fixture
def zero_click(zero_click_with):
    return zero_click_with()


def nothing_drawn(url: str = VIDEO_URL) -> dict:
    body = recorded("20-video-predict-batch.json")
    body["tasks"][0]["data"]["video"] = url
    return body


@pytest.mark.parametrize("url", [VIDEO_URL, STILL_URL])
def test_a_task_with_nothing_drawn_gets_one_track_per_linked_object(zero_click, clips, url):
    client, predictor = zero_click
    body = nothing_drawn(url)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    # The detector itself, run on the decoded frames, with the project's labels as the caption.
    config = parse_video_config(body["label_config"])
    query = phrases_query(config.labels, config.phrases)
    detector = predictor.detector.get(60)
    video = VideoFile.open(clips[url], VideoLimits(FRAMES, HEIGHT * WIDTH))
    found = []
    for index, pixels in video.frames(every=EVERY):
        (boxes,) = detector.detect([pixels], query.caption, list(query.spans), query.label_groups, 0.0, 0.0, 2, 1)
        found.append([FrameDetection(index, d.box, d.score, query.labels[d.phrase]) for d in boxes])
    assert [detections[0].frame for detections in found] == list(range(0, FRAMES, EVERY))
    assert all(found), "the lowered thresholds let boxes through on every frame"
    linked = link_detections(found)
    chains = strongest(linked, 3)
    assert len(linked) > len(chains) == 3  # MAX_VIDEO_OBJECTS: the strongest chains
    if url == STILL_URL:
        assert any(len(chain.detections) > 1 for chain in chains), "detections of one object linked into one chain"
    # One region per chain, the project's labels, keyframes at the detection frames equal to the detector's boxes.
    assert len(entry["result"]) == len(chains)
    regions = video_objects(entry["result"])
    size = (HEIGHT, WIDTH)
    for region, chain, result in zip(regions, chains, entry["result"], strict=True):
        assert result["from_name"] == "box" and result["to_name"] == "video"
        assert region.labels == (chain.label,) and chain.label in config.labels
        sequence = {keyframe.frame: keyframe for keyframe in region.keyframes}
        for detection in chain.detections:
            frame = detection.frame + 1  # the Video tag's framerate is the file's: frame f is index f - 1
            expected = VideoBox.from_pixels(frame, detection.box, size)
            got = sequence[frame]
            assert (got.x, got.y, got.width, got.height) == pytest.approx(
                (expected.x, expected.y, expected.width, expected.height)
            )
    assert len({result["id"] for result in entry["result"]}) == len(chains)


def test_without_labels_a_task_with_nothing_drawn_says_what_to_do(zero_click):
    client, _ = zero_click
    body = nothing_drawn()
    body["label_config"] = (
        '<View><Video name="video" value="$video"/><VideoRectangle name="box" toName="video"/></View>'
    )
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert "draw a box on the objects" in response.json["error"]
    assert "<Labels> control" in response.json["error"]


def test_zero_click_past_the_deadline_says_what_would_make_it_fit(zero_click_with):
    """With no project named there is no tracking run to go on in (tests/test_video_runs.py): the error says what
    would make the detection fit."""
    client, _ = zero_click_with(predict_deadline_s=0.001)
    body = nothing_drawn()
    del body["project"]
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert "detecting the project's labels on every 5 of the video's 16 frames" in response.json["error"]
    assert "VIDEO_DETECT_EVERY" in response.json["error"]


def test_queue_mode_pre_annotates_on_a_worker_as_this_process_does(
    zero_click, settings, queue_redis, workers, video_folder, detector_folder, label_studio
):
    """The web tier (no model) enqueues the task with no objects, as a track; the worker detects, links and
    tracks with its own detector, and answers what this process answers."""
    local_client, _ = zero_click
    local = local_client.post("/predict", json=nothing_drawn())
    assert local.status_code == 200, local.json
    web = video_web_tier(settings, queue_redis.url, video_folder)
    workers.start(
        1,
        VIDEO_CHECKPOINT=str(video_folder),
        DETECTOR="grounding-dino",
        DETECTOR_MODEL=str(detector_folder),
        GROUNDING_DINO_IMAGE_SIZE="64",
        BOX_THRESHOLD="0",
        TEXT_THRESHOLD="0",
        MAX_OBJECTS="2",
        MAX_VIDEO_OBJECTS="3",
        VIDEO_DETECT_EVERY=str(EVERY),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
        JOB_TIMEOUT="300",
    )
    queued = web.post("/predict", json=nothing_drawn())
    assert queued.status_code == 200, queued.json
    assert rounded(queued.json["results"]) == rounded(local.json["results"])


def test_a_tracking_run_pre_annotates_a_task_with_nothing_drawn_as_predict_does(zero_click, label_studio):
    """In a project whose video has labels, the project's tracking run (/track) takes tasks with nothing drawn too,
    and imports what /predict answers for them."""
    client, _ = zero_click
    body = nothing_drawn(STILL_URL)
    project = label_studio.add_project(body["label_config"], [STILL_URL], field="video")
    (task,) = label_studio.projects[project]["tasks"]
    answered = client.post("/predict", json=body)
    assert answered.status_code == 200, answered.json

    assert client.post(f"/track?project={project}").status_code == 202
    progress = ended(client, project)

    assert (progress["state"], progress["predicted"], progress["skipped"]) == ("finished", 1, 0), progress
    (imported,) = label_studio.imported[project]
    assert imported["task"] == task["id"]
    assert rounded(imported["result"]) == rounded(answered.json["results"][0]["result"])
