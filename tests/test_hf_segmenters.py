"""SAM 2.1, EdgeTAM, SAM-HQ and SAM 3's tracker behind the Segmenter interface: random weights at reduced sizes,
saved by transformers' own save_pretrained and loaded through the registry. The backend's masks, through its Redis
cache (float16), equal transformers' own processor + model forward for the same image and prompts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.bookkeeping.imports import ImportedTask, ImportedTasks
from backend.cache.embeddings import VIT_ENTRY_BYTES, EmbeddingCache, deserialize_embedding, serialize_embedding
from backend.cache.store import ROOM_FRACTION, MemoryStore, make_store
from backend.config import TRANSFORMERS_SEGMENTERS, Settings
from backend.errors import CheckpointMissing, WrongCheckpoint
from backend.images import FetchRules, ImageFetcher
from backend.inference.encode_ahead import Step
from backend.inference.local import Predictor
from backend.models import registry
from backend.models.base import SegmentPrompt
from backend.models.checkpoints import TRANSFORMERS_MODELS, check_model_folder
from backend.models.hf_decoder import OnnxHfDecoder
from backend.models.hf_segmenter import HfSegmenter
from backend.models.registry import load_segmenter
from backend.project_files import ProjectFiles
from backend.training.resources import TrainingResources
from backend.training.support import fine_tuning_refusal
from backend.training.trainer import train_project
from tests.assets import smooth_object_image
from tests.hf_segmenters import REDUCED, official_sam3_layout, write_models

IMAGE = smooth_object_image(640, 480, seed=3)
PROMPTS = {
    "one click": SegmentPrompt(points=[(300.0, 200.0)], point_labels=[1]),
    "box": SegmentPrompt(box=(120.0, 90.0, 420.0, 330.0)),
    "box and clicks": SegmentPrompt(
        points=[(300.0, 200.0), (150.0, 100.0)], point_labels=[1, 0], box=(120.0, 90.0, 420.0, 330.0)
    ),
}


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("transformers-models"), reduced=True)


@pytest.fixture(scope="module")
def segmenters(model_folders) -> dict[str, HfSegmenter]:
    torch.set_num_threads(2)
    loaded = {}
    for name, folder in model_folders.items():
        segmenter = load_segmenter(replace(Settings(), sam_model_type=name, sam_checkpoint=str(folder), device="cpu"))
        assert isinstance(segmenter, HfSegmenter)
        loaded[name] = segmenter
    return loaded


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# How far a predicted IoU through the float16 cache may be from the library's float32 one.
SCORE_TOLERANCE = 0.02


def library_prediction(
    segmenter: HfSegmenter, prompt: SegmentPrompt, mask_logits: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """transformers' documented use: the processor prepares image and prompts, the model runs whole (its own
    encoder, in float32), the processor post-processes; the best of the masks by predicted IoU, and that IoU."""
    processor = segmenter.processor
    kwargs: dict = {}
    if prompt.points:
        kwargs["input_points"] = [[[list(point) for point in prompt.points]]]
        kwargs["input_labels"] = [[list(prompt.point_labels)]]
    if prompt.box is not None:
        kwargs["input_boxes"] = [[list(prompt.box)]]
    inputs = processor(images=IMAGE, return_tensors="pt", **kwargs)
    forward = {key: value for key, value in inputs.items() if key not in ("original_sizes", "reshaped_input_sizes")}
    if mask_logits is not None:
        forward["input_masks"] = torch.as_tensor(mask_logits, dtype=torch.float32)[None, None]
    multimask = len(prompt.points) == 1 and prompt.box is None and mask_logits is None
    with torch.inference_mode():
        output = segmenter.model(**forward, multimask_output=multimask)
    extra = [inputs["reshaped_input_sizes"]] if segmenter.family.padded else []
    (masks,) = processor.post_process_masks(output.pred_masks, inputs["original_sizes"], *extra)
    best = int(output.iou_scores[0, 0].argmax())
    return masks[0, best].numpy(), float(output.iou_scores[0, 0, best])


@pytest.mark.parametrize("name", REDUCED)
def test_masks_through_the_cache_equal_the_librarys_own_prediction(segmenters, redis_url, name):
    segmenter = segmenters[name]
    cache = EmbeddingCache(make_store(redis_url, 0), segmenter, ttl_s=60, lock_timeout_s=30)
    first = cache.get_or_encode(f"parity-{name}", lambda: IMAGE)
    assert not first.cache_hit
    cached = cache.get_or_encode(f"parity-{name}", lambda: IMAGE)
    assert cached.cache_hit and cached.embedding.features.dtype == np.float16
    assert set(cached.embedding.extras) == set(segmenter.encode(IMAGE).extras)
    ours = segmenter.decode(cached.embedding, list(PROMPTS.values()))
    for (what, prompt), prediction in zip(PROMPTS.items(), ours, strict=True):
        reference, score = library_prediction(segmenter, prompt)
        assert 0 < reference.sum() < reference.size, f"{name} {what}: the library's mask is empty or full"
        assert iou(prediction.mask, reference) >= 0.95, f"{name} {what}"
        assert prediction.score == pytest.approx(score, abs=SCORE_TOLERANCE), f"{name} {what}"


@pytest.mark.parametrize("name", REDUCED)
def test_refinement_with_the_previous_low_res_logits_equals_the_library(segmenters, name):
    segmenter = segmenters[name]
    embedding = deserialize_embedding(serialize_embedding(segmenter.encode(IMAGE)))
    click = PROMPTS["one click"]
    (first,) = segmenter.decode(embedding, [click])
    side = 288 if name == "sam3" else 256  # SAM 3's mask grid is 4x its 72x72 embedding
    assert first.low_res_logits.shape == (side, side)
    second_click = SegmentPrompt(
        points=[*click.points, (200.0, 150.0)], point_labels=[1, 1], mask_logits=first.low_res_logits
    )
    (refined,) = segmenter.decode(embedding, [second_click])
    reference, score = library_prediction(segmenter, second_click, first.low_res_logits)
    assert 0 < reference.sum() < reference.size
    assert iou(refined.mask, reference) >= 0.95
    assert refined.score == pytest.approx(score, abs=SCORE_TOLERANCE)
    # The mask prompt is used: the same clicks without it give another mask.
    (unrefined,) = segmenter.decode(embedding, [replace(second_click, mask_logits=None)])
    assert not np.array_equal(unrefined.low_res_logits, refined.low_res_logits)


@pytest.mark.parametrize("name", REDUCED)
def test_float16_cache_masks_match_float32_masks(segmenters, name):
    segmenter = segmenters[name]
    exact = segmenter.encode(IMAGE)
    stored = deserialize_embedding(serialize_embedding(exact))
    assert all(array.dtype == np.float16 for array in [stored.features, *stored.extras.values()])
    prompts = list(PROMPTS.values())
    for full, half in zip(segmenter.decode(exact, prompts), segmenter.decode(stored, prompts), strict=True):
        assert iou(full.mask, half.mask) >= 0.99


@pytest.mark.parametrize("name", REDUCED)
def test_the_onnx_decoder_computes_the_models_own_pytorch_forward(segmenters, name):
    """The CPU default runs one traced graph per prompt shape in ONNX Runtime: for every shape, one prompt alone and
    three at once, its logits and scores are the model's forward in PyTorch."""
    onnx = segmenters[name]
    assert isinstance(onnx.decoder, OnnxHfDecoder)
    torch_run = HfSegmenter(onnx.model, onnx.processor, onnx.family, "torch", onnx.device, decoder_runtime="torch")
    embedding = deserialize_embedding(serialize_embedding(onnx.encode(IMAGE)))
    (previous,) = torch_run.decode(embedding, [PROMPTS["one click"]])
    refinement = replace(PROMPTS["box and clicks"], mask_logits=previous.low_res_logits)
    for prompt in [*PROMPTS.values(), refinement]:
        for prompts in ([prompt], [prompt] * 3):
            for ours, reference in zip(
                onnx.decode(embedding, prompts), torch_run.decode(embedding, prompts), strict=True
            ):
                np.testing.assert_allclose(ours.low_res_logits, reference.low_res_logits, atol=1e-3, rtol=1e-3)
                assert ours.score == pytest.approx(reference.score, abs=1e-4)
                assert iou(ours.mask, reference.mask) >= 0.99


def test_prompts_of_mixed_shapes_come_back_in_their_order(segmenters):
    segmenter = segmenters["sam2.1-hiera-tiny"]
    embedding = segmenter.encode(IMAGE)
    prompts = list(PROMPTS.values())
    together = segmenter.decode(embedding, [prompts[1], prompts[0], prompts[2], prompts[0]])
    alone = [segmenter.decode(embedding, [prompt])[0] for prompt in (prompts[1], prompts[0], prompts[2], prompts[0])]
    for mixed, single in zip(together, alone, strict=True):
        assert iou(mixed.mask, single.mask) >= 0.99


def test_sam3_loads_from_the_official_folders_layout_reading_only_the_trackers_tensors(
    segmenters, model_folders, tmp_path
):
    folder = official_sam3_layout(model_folders["sam3"], tmp_path / "sam3")
    official = load_segmenter(replace(Settings(), sam_model_type="sam3", sam_checkpoint=str(folder), device="cpu"))
    assert isinstance(official, HfSegmenter)
    reference = segmenters["sam3"].model.state_dict()
    loaded = official.model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)


def test_a_folder_of_another_model_is_refused_naming_both(model_folders):
    settings = replace(
        Settings(), sam_model_type="sam-hq-vit-b", sam_checkpoint=str(model_folders["edgetam"]), device="cpu"
    )
    with pytest.raises(WrongCheckpoint) as raised:
        load_segmenter(settings)
    assert "SAM_MODEL_TYPE=sam-hq-vit-b" in str(raised.value) and "'edgetam'" in str(raised.value)


def test_a_sam_pth_file_given_for_a_transformers_model_is_refused(sam_checkpoint):
    settings = replace(Settings(), sam_model_type="sam2.1-hiera-tiny", sam_checkpoint=str(sam_checkpoint))
    with pytest.raises(WrongCheckpoint, match="Hugging Face model folder"):
        load_segmenter(settings)


def test_the_default_folder_absent_names_the_setting_and_the_download(tmp_path):
    settings = replace(Settings(), sam_model_type="sam2.1-hiera-large", weights_dir=str(tmp_path))
    location = registry.sam_checkpoint(settings)
    assert location.path == tmp_path / "sam2.1-hiera-large"
    assert location.official is TRANSFORMERS_MODELS["sam2.1-hiera-large"]
    with pytest.raises(CheckpointMissing, match="python -m backend weights download"):
        load_segmenter(settings)


def test_every_transformers_choice_has_an_official_repository():
    assert set(TRANSFORMERS_SEGMENTERS) == set(TRANSFORMERS_MODELS)


def test_training_is_refused_clearly_for_a_model_it_cannot_fine_tune(segmenters, redis_url, tmp_path):
    name = "sam2.1-hiera-tiny"
    settings = replace(Settings(), sam_model_type=name, model_dir=str(tmp_path))
    reason = fine_tuning_refusal(settings)
    assert reason is not None and name in reason and "vit_b" in reason
    assert fine_tuning_refusal(replace(settings, sam_model_type="vit_b")) is None
    segmenter = segmenters[name]
    resources = TrainingResources(
        segmenter,
        EmbeddingCache(make_store(redis_url, 0), segmenter, 60, 30),
        ImageFetcher(FetchRules.of(settings)),
        settings.max_image_pixels,
        settings.train_features_max_mb * 2**20,
    )
    result = train_project(7, settings, resources)
    assert result.as_dict()["status"] == "refused" and result.as_dict()["reason"] == reason


def test_a_downloaded_folder_is_checked_to_hold_the_model_it_was_fetched_as(model_folders):
    check_model_folder(model_folders["sam2.1-hiera-tiny"], TRANSFORMERS_MODELS["sam2.1-hiera-tiny"])
    with pytest.raises(WrongCheckpoint, match="holds a .sam2. model, not a sam_hq one"):
        check_model_folder(model_folders["sam2.1-hiera-tiny"], TRANSFORMERS_MODELS["sam-hq-vit-b"])


def test_the_weights_command_predict_and_the_demo_offer_every_segmenter():
    from backend.cli import SEGMENTERS
    from backend.tools.demo import SAM_MODEL_TYPES

    assert set(SEGMENTERS) == set(SAM_MODEL_TYPES) == {"vit_b", "vit_l", "vit_h", *TRANSFORMERS_SEGMENTERS}


def test_encoding_ahead_sizes_the_cache_room_by_the_served_models_entries(model_folders, settings):
    """A SAM 2 entry (features and high-resolution maps) is several times a ViT one. A cache with room for the
    clicked image's entry and a ViT-sized one, not a second SAM 2 one: encoding imports ahead stops rather than evict
    it."""
    name = "sam2.1-hiera-tiny"
    sam2_settings = replace(settings, sam_model_type=name, sam_checkpoint=str(model_folders[name]))
    entry_bytes = len(serialize_embedding(load_segmenter(sam2_settings).encode(IMAGE)))
    assert entry_bytes > 2 * VIT_ENTRY_BYTES
    # Room below the fraction for the clicked entry and half way between a ViT entry and a SAM 2 one.
    store = MemoryStore(int((entry_bytes + (entry_bytes + VIT_ENTRY_BYTES) // 2) / ROOM_FRACTION))
    predictor = Predictor(sam2_settings, store)
    predictor.models.start()
    clicked, ahead = "/data/upload/1/e0d87ad7-car_640x480.jpg", "/data/upload/1/arc2017.jpg"
    assert predictor.encode_url(clicked, 1) is False
    imported = ImportedTasks(ProjectFiles(settings.model_dir, 1))
    imported.append([ImportedTask(2, ahead)])
    assert predictor.encode_ahead(1, lambda: None, True) is Step.AT_BOUND
    assert imported.pending()  # left for later
    assert predictor.encode_url(clicked) is True  # still cached
