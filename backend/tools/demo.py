"""The demo page (`python -m backend demo`): lang-segment-anything's app, running the backend's own code path.

Same inputs as that app (SAM model type, box threshold, text threshold, image, text prompt), plus the detector;
the overlay picture and the detections come back. Each pair of SAM model type and detector gets its own
Predictor, made when first chosen; all of them share the configured embedding store (CACHE_REDIS_URL, else
REDIS_URL), so an image segmented here is already encoded when an annotator clicks on it in Label Studio, and
the other way round. Gradio is an optional extra (requirements-demo.txt): only `python -m backend demo` imports
this module.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from backend.cache.store import ByteStore, make_store
from backend.config import DETECTORS, SAM_TYPES, TRANSFORMERS_SEGMENTERS, Settings
from backend.errors import ImageError, ModelNotReady, PromptError
from backend.images import FetchedImage
from backend.inference.local import Predictor
from backend.tools.segment_text import detections_json, overlay, segment_text

# lang-segment-anything's choices, in its order, then the models transformers runs.
SAM_MODEL_TYPES = [*reversed(SAM_TYPES), *TRANSFORMERS_SEGMENTERS]
LOAD_WAIT_S = 600.0  # a first request waits for the weights to load rather than failing


def with_segmenter(settings: Settings, sam_model_type: str) -> Settings:
    """`settings` running `sam_model_type`: SAM_CHECKPOINT names the configured type's weights, so another type
    uses its official file or folder in WEIGHTS_DIR."""
    own_weights = sam_model_type == settings.sam_model_type
    return replace(
        settings, sam_model_type=sam_model_type, sam_checkpoint=settings.sam_checkpoint if own_weights else ""
    )


def with_detector(settings: Settings, detector: str) -> Settings:
    """`settings` running `detector`: DETECTOR_MODEL names the configured detector's folder, so another detector
    reads its official one in WEIGHTS_DIR."""
    if detector == settings.detector:
        return settings
    return replace(settings, detector=detector, detector_model="")


class DemoPredictors:
    """One Predictor per SAM model type and detector, sharing one embedding store."""

    def __init__(self, settings: Settings, store: ByteStore) -> None:
        self.settings = settings
        self.store = store
        self._predictors: dict[tuple[str, str], Predictor] = {}
        self._mutex = threading.Lock()

    def get(self, sam_model_type: str, detector: str) -> Predictor:
        with self._mutex:
            predictor = self._predictors.get((sam_model_type, detector))
            if predictor is None:
                settings = with_detector(with_segmenter(self.settings, sam_model_type), detector)
                settings = replace(settings, model_ready_timeout_s=LOAD_WAIT_S)
                predictor = self._predictors[sam_model_type, detector] = Predictor(settings, self.store)
                predictor.models.start()
            return predictor


def build_demo(settings: Settings):  # -> gradio.Blocks; gradio is imported here only
    import gradio as gr

    predictors = DemoPredictors(settings, make_store(settings.cache_url, settings.memory_cache_bytes))
    default_type = settings.sam_model_type

    def run(
        sam_model_type: str,
        detector: str,
        box_threshold: float,
        text_threshold: float,
        image_path: str,
        text_prompt: str,
    ):
        if not image_path:
            raise gr.Error("upload an image first")
        predictor = predictors.get(sam_model_type, detector)
        # The uploaded file's own bytes: the same digest, so the same cached embedding, as in Label Studio.
        image = FetchedImage(image_path, Path(image_path).read_bytes())
        try:
            prediction = segment_text(predictor, image, text_prompt or "", box_threshold, text_threshold)
        except (PromptError, ImageError, ModelNotReady) as error:
            raise gr.Error(str(error)) from error
        return overlay(image, prediction, settings.max_image_pixels), detections_json(prediction)

    return gr.Interface(
        fn=run,
        inputs=[
            gr.Dropdown(SAM_MODEL_TYPES, value=default_type, label="SAM model type"),
            gr.Dropdown(list(DETECTORS), value=settings.detector, label="Detector"),
            gr.Slider(0.0, 1.0, value=settings.box_threshold, step=0.05, label="Box threshold"),
            gr.Slider(0.0, 1.0, value=settings.text_threshold, step=0.05, label="Text threshold"),
            gr.Image(type="filepath", label="Image"),
            gr.Textbox(label="Text prompt", placeholder="car, wheel"),
        ],
        outputs=[gr.Image(type="numpy", label="Masks, boxes and labels"), gr.JSON(label="Detections")],
        title="SAM + a text-prompted detector",
        description="Type what to segment; each comma-separated phrase becomes a label.",
        api_name="predict",
        flagging_mode="never",
    )
