"""Video tracking: frames decoded as a stream, and SAM 2.1, EdgeTAM and SAM 3's video predictors tracking boxes.

The models are the real transformers architectures with random weights, reduced (tests/hf_segmenters.py). Random
weights cannot follow a shape, so tracking is checked by parity: each object's masks equal those of the library's own
video predictor, driven as its documentation drives it, on the whole video held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import VideoError, WrongCheckpoint
from backend.models.video_tracker import BoxPrompt, VideoTracker, load_video_tracker
from backend.protocol.polygons import tight_box
from backend.videos import VideoFile, VideoLimits
from tests.detector_weights import write_sam3
from tests.hf_segmenters import VIDEO_MODELS, write_models
from tests.synthetic_video import MovingShapes, write_moving_shapes

ROOMY = VideoLimits(max_frames=10_000, max_pixels=10_000_000)
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def video_model_folders(tmp_path_factory) -> dict[str, Path]:
    folders = write_models(tmp_path_factory.mktemp("video-models"), True, VIDEO_MODELS)
    folders["sam3"] = write_sam3(tmp_path_factory.mktemp("sam3") / "sam3")
    return folders


@pytest.fixture(scope="session")
def sam2_tracker(video_model_folders) -> VideoTracker:
    return load_video_tracker(video_model_folders["sam2.1-hiera-tiny-video"], "sam2_video", "sam2.1-hiera-tiny", CPU)


@pytest.fixture(scope="session")
def shapes_video(tmp_path_factory) -> MovingShapes:
    return write_moving_shapes(tmp_path_factory.mktemp("video") / "shapes.mp4", frames=24)


def library_masks(
    tracker: VideoTracker, video: MovingShapes, prompts: list[BoxPrompt]
) -> dict[tuple[int, int], np.ndarray]:
    """(frame, object) -> low-resolution mask logits from the library's own predictor, as its documentation runs
    it: the whole video in one session, each object alone, its boxes added and run on their frames, then
    `propagate_in_video_iterator` forward and in reverse."""
    with VideoFileFrames(video.path) as frames, torch.inference_mode():
        results = {}
        for object_id in sorted({prompt.object_id for prompt in prompts}):
            session = tracker.processor.init_video_session(video=frames, inference_device="cpu", dtype=torch.float32)
            for prompt in sorted((p for p in prompts if p.object_id == object_id), key=lambda p: p.frame):
                tracker.processor.add_inputs_to_inference_session(
                    session, frame_idx=prompt.frame, obj_ids=[object_id], input_boxes=[[list(prompt.box)]]
                )
                output = tracker.model(inference_session=session, frame_idx=prompt.frame)
                results[(prompt.frame, object_id)] = output.pred_masks[0].numpy()
            for reverse in (False, True):
                for output in tracker.model.propagate_in_video_iterator(session, reverse=reverse):
                    results[(output.frame_idx, object_id)] = output.pred_masks[0].numpy()
        return results


class VideoFileFrames:
    """Every frame of a video as a list, as the library's documentation loads one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> list[np.ndarray]:
        video = VideoFile.open(self.path, ROOMY)
        return [pixels for _, pixels in video.frames()]

    def __exit__(self, *exc_info: object) -> None:
        return None


def our_results(tracker: VideoTracker, path: Path, prompts: list[BoxPrompt]):
    """(frame, object) -> the ObjectOnFrame that stands (the last one given for it)."""
    results = {}
    for tracked in tracker.track(VideoFile.open(path, ROOMY), prompts):
        for object_id, state in tracked.objects.items():
            results[(tracked.frame, object_id)] = state
    return results


def assert_equal_to_library(tracker: VideoTracker, video: MovingShapes, prompts: list[BoxPrompt]) -> None:
    ours = our_results(tracker, video.path, prompts)
    reference = library_masks(tracker, video, prompts)
    assert sorted(ours) == sorted(reference)
    for key, logits in reference.items():
        np.testing.assert_array_equal(ours[key].mask_logits, logits, err_msg=f"frame, object {key}")


def test_sam2_tracks_two_objects_as_the_librarys_video_predictor(sam2_tracker, shapes_video):
    # The rectangle from frame 3 (forward, and backward to frame 0), the square from frame 8 with a correction on 14.
    prompts = [
        BoxPrompt(1, 3, shapes_video.box(0, 3)),
        BoxPrompt(2, 8, shapes_video.box(1, 8)),
        BoxPrompt(2, 14, shapes_video.box(1, 14)),
    ]
    assert_equal_to_library(sam2_tracker, shapes_video, prompts)


def test_edgetam_tracks_as_the_librarys_video_predictor(video_model_folders, tmp_path):
    tracker = load_video_tracker(video_model_folders["edgetam-video"], "edgetam_video", "edgetam", CPU)
    video = write_moving_shapes(tmp_path / "short.mp4", frames=6)
    assert_equal_to_library(tracker, video, [BoxPrompt(1, 2, video.box(0, 2))])


def test_sam3_tracker_reads_facebook_sam3s_folder_and_tracks_as_the_library(video_model_folders, tmp_path):
    tracker = load_video_tracker(video_model_folders["sam3"], "sam3_tracker_video", "sam3", CPU)
    video = write_moving_shapes(tmp_path / "short.mp4", frames=3)
    assert_equal_to_library(tracker, video, [BoxPrompt(1, 1, video.box(1, 1))])


def test_objects_tracked_together_equal_each_tracked_alone(sam2_tracker, shapes_video):
    prompts = [BoxPrompt(1, 0, shapes_video.box(0, 0)), BoxPrompt(2, 5, shapes_video.box(1, 5))]
    together = our_results(sam2_tracker, shapes_video.path, prompts)
    for prompt in prompts:
        alone = our_results(sam2_tracker, shapes_video.path, [prompt])
        assert {key for key in together if key[1] == prompt.object_id} == set(alone)
        for key, state in alone.items():
            np.testing.assert_array_equal(together[key].mask_logits, state.mask_logits)
            assert together[key].box == state.box


def tracker_sure_of_presence(folders: dict[str, Path], logit: float) -> VideoTracker:
    """The SAM 2.1 tracker with its object-score head's output bias set: random weights put the score near one
    half, so this decides whether the model finds the object present (and keeps its mask) or absent."""
    tracker = load_video_tracker(folders["sam2.1-hiera-tiny-video"], "sam2_video", "sam2.1-hiera-tiny", CPU)
    with torch.no_grad():
        tracker.model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(logit)
    return tracker


def test_boxes_are_the_tight_boxes_of_the_librarys_masks(video_model_folders, shapes_video):
    tracker = tracker_sure_of_presence(video_model_folders, 5.0)
    prompts = [BoxPrompt(1, 2, shapes_video.box(0, 2))]
    ours = our_results(tracker, shapes_video.path, prompts)
    reference = library_masks(tracker, shapes_video, prompts)
    for key, logits in reference.items():
        (masks,) = tracker.processor.post_process_masks(
            [torch.from_numpy(logits)[None]], [[shapes_video.height, shapes_video.width]], binarize=False
        )
        assert ours[key].box is not None
        assert ours[key].box == tight_box((masks[0, 0] > 0).numpy())
        assert ours[key].score > 0.99


def test_an_object_the_model_finds_absent_has_no_box(video_model_folders, shapes_video):
    tracker = tracker_sure_of_presence(video_model_folders, -5.0)
    ours = our_results(tracker, shapes_video.path, [BoxPrompt(1, 4, shapes_video.box(0, 4))])
    assert len(ours) == 24
    assert all(state.score < 0.01 and state.box is None for state in ours.values())


def test_outputs_kept_stay_bounded_on_a_long_video(sam2_tracker, tmp_path):
    video = write_moving_shapes(tmp_path / "long.mp4", frames=80, height=48, width=64)
    kept: list[int] = []

    def count_outputs(module, args, kwargs):
        session = kwargs["inference_session"]
        kept.append(sum(len(outputs["non_cond_frame_outputs"]) for outputs in session.output_dict_per_obj.values()))

    hook = sam2_tracker.model.register_forward_pre_hook(count_outputs, with_kwargs=True)
    try:
        frames = {
            tracked.frame
            for tracked in sam2_tracker.track(VideoFile.open(video.path, ROOMY), [BoxPrompt(1, 30, video.box(0, 30))])
        }
    finally:
        hook.remove()
    assert frames == set(range(80))
    reach = sam2_tracker.memory_reach
    # The library keeps all 79 tracked frames' outputs; here the last `reach` and the `reach` after the keyframe.
    assert max(kept) <= 2 * reach + 1
    assert len(kept) == 1 + 50 + 31  # the keyframe, forward 30..79, backward 30..0


def test_a_model_folder_of_another_kind_is_refused_naming_the_setting(video_model_folders):
    with pytest.raises(WrongCheckpoint, match="VIDEO_MODEL=edgetam loads a 'edgetam_video' model") as refused:
        load_video_tracker(video_model_folders["sam2.1-hiera-tiny-video"], "edgetam_video", "edgetam", CPU)
    assert "VIDEO_CHECKPOINT" in str(refused.value)


# Decoding


def test_header_gives_frames_size_and_rate(shapes_video):
    video = VideoFile.open(shapes_video.path, ROOMY)
    assert (video.frame_count, video.width, video.height, video.fps) == (24, 128, 96, 25.0)
    assert video.duration == pytest.approx(24 / 25)


def test_a_span_read_after_a_seek_equals_the_same_frames_decoded_from_the_start(shapes_video):
    video = VideoFile.open(shapes_video.path, ROOMY)
    everything = dict(video.frames())
    assert sorted(everything) == list(range(24))
    for start, stop in ((12, 17), (7, 8), (20, 99), (0, 3)):
        span = dict(video.frames(start, stop))
        assert sorted(span) == list(range(start, min(stop, 24)))
        for index, pixels in span.items():
            np.testing.assert_array_equal(pixels, everything[index])


def test_frames_show_the_shapes_where_they_were_drawn(shapes_video):
    video = VideoFile.open(shapes_video.path, ROOMY)
    for index, pixels in video.frames(0, 24):
        x0, y0, x1, y1 = (int(value) for value in shapes_video.box(0, index))
        assert pixels[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean() > 220  # the white rectangle, through H.264


def test_caps_are_checked_on_the_header_before_any_frame_is_decoded(shapes_video, tmp_path):
    # Every byte of the frames (the mp4's mdat box) zeroed: a decoder would fail, so a 413 proves none was decoded.
    data = bytearray(shapes_video.path.read_bytes())
    box = data.index(b"mdat") - 4
    end = box + int.from_bytes(data[box : box + 4], "big")
    data[box + 8 : end] = bytes(end - box - 8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with pytest.raises(VideoError, match="cannot decode the video broken.mp4"):
        list(VideoFile.open(broken, ROOMY).frames())
    with pytest.raises(VideoError, match="MAX_VIDEO_FRAMES=10") as refused:
        VideoFile.open(broken, VideoLimits(max_frames=10, max_pixels=10_000_000))
    assert refused.value.status == 413
    with pytest.raises(VideoError, match="128x96 exceed MAX_VIDEO_PIXELS=1000") as refused:
        VideoFile.open(broken, VideoLimits(max_frames=100, max_pixels=1000))
    assert refused.value.status == 413


def test_a_file_that_is_no_video_is_refused(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoError, match="cannot read the video notes.mp4") as refused:
        VideoFile.open(text, ROOMY)
    assert refused.value.status == 422
