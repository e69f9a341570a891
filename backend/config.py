"""All configuration: one frozen dataclass whose fields carry their environment variable, default and meaning.

`Settings.from_env()` is the only reader of os.environ for the backend. Each field's metadata names its
variable (following label-studio-ml's names where they exist: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
BASIC_AUTH_USER, BASIC_AUTH_PASS, MODEL_DIR, WORKERS, THREADS, LOG_LEVEL), what it means and, for a choice,
the allowed values; docs/configuration.md is generated from the same metadata (`python -m backend settings
--markdown`), so the table cannot drift from the code. A value that cannot be parsed or is not among the
allowed ones stops the process at start-up with a message naming the variable and what it accepts.

Why a dataclass and not pydantic-settings: the fields are flat strings and numbers, the names are fixed by
label-studio-ml's conventions rather than derived from field names, and the parser below is short; a frozen
dataclass also keeps `dataclasses.replace`, which the tests and the CLI use to derive variants.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from backend.errors import SettingsError


def setting(
    env: str,
    default: object,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    pattern: str = "",
    secret: bool = False,
    section: str = "",
) -> typing.Any:
    """A field read from environment variable `env`; `doc` is its line in docs/configuration.md."""
    metadata = {"env": env, "doc": doc, "choices": choices, "minimum": minimum, "pattern": pattern, "section": section}
    return field(default=default, repr=not secret, metadata=metadata)


# The text-prompted detectors DETECTOR chooses among (backend.models.registry loads each).
DETECTORS = ("groundingdino-py", "grounding-dino", "mm-grounding-dino", "owlv2", "sam3")

S_LABEL_STUDIO = "Label Studio and images"
S_HTTP = "HTTP server"
S_MODELS = "Models"
S_DETECTOR = "Detector (pre-annotation and text prompts)"
S_REGIONS = "Polygons and boxes"
S_CACHE = "Cache"
S_QUEUE = "Queue mode"
S_TRAINING = "Active learning"
S_VIDEO = "Video tracking"

# Meta's SAM, loaded from its `.pth` files by segment-anything.
SAM_TYPES = ("vit_b", "vit_l", "vit_h")
# Models run by Hugging Face transformers, each from a model folder (backend/models/hf_segmenter.py).
TRANSFORMERS_SEGMENTERS = (
    "sam2.1-hiera-tiny",
    "sam2.1-hiera-small",
    "sam2.1-hiera-base-plus",
    "sam2.1-hiera-large",
    "edgetam",
    "sam-hq-vit-b",
    "sam-hq-vit-l",
    "sam-hq-vit-h",
    "sam3",
)
# The video predictors VIDEO_MODEL chooses among (backend/models/video_tracker.py): each a transformers model folder.
VIDEO_MODELS = (
    "sam2.1-hiera-tiny",
    "sam2.1-hiera-small",
    "sam2.1-hiera-base-plus",
    "sam2.1-hiera-large",
    "edgetam",
    "sam3",
)


@dataclass(frozen=True)
class Settings:
    """Everything the backend can be told."""

    label_studio_url: str = setting(
        "LABEL_STUDIO_URL",
        "",
        "Label Studio's base URL, for `/data/upload/...` and `/data/local-files/...` images",
        section=S_LABEL_STUDIO,
    )
    label_studio_api_key: str = setting(
        "LABEL_STUDIO_API_KEY",
        "",
        "legacy token (sent as `Token`) or personal access token (exchanged for a short-lived `Bearer` token); "
        "the kind is detected",
        secret=True,
        section=S_LABEL_STUDIO,
    )
    local_files_document_root: str = setting(
        "LOCAL_FILES_DOCUMENT_ROOT",
        "",
        "read `/data/local-files/?d=...` from this folder directly (nothing outside it)",
        section=S_LABEL_STUDIO,
    )
    allowed_image_hosts: tuple[str, ...] = setting(
        "ALLOWED_IMAGE_HOSTS",
        (),
        "comma-separated hosts whose `http(s)://` images may be fetched (no credentials sent)",
        section=S_LABEL_STUDIO,
    )
    allow_private_image_hosts: bool = setting(
        "ALLOW_PRIVATE_IMAGE_HOSTS",
        False,
        "let `ALLOWED_IMAGE_HOSTS` resolve to loopback or private addresses (never to cloud metadata ones)",
        section=S_LABEL_STUDIO,
    )
    download_timeout_s: float = setting(
        "DOWNLOAD_TIMEOUT",
        10.0,
        "seconds an image download may take in all (connecting, redirects, headers and body)",
        minimum=0.001,
        section=S_LABEL_STUDIO,
    )
    max_download_bytes: int = setting(
        "MAX_DOWNLOAD_BYTES", 50 * 1024 * 1024, "largest image file accepted", minimum=1, section=S_LABEL_STUDIO
    )
    max_image_pixels: int = setting(
        "MAX_IMAGE_PIXELS",
        40_000_000,
        "largest image (width × height) decoded; larger is refused as a bomb",
        minimum=1,
        section=S_LABEL_STUDIO,
    )

    host: str = setting("HOST", "0.0.0.0", "address gunicorn binds", section=S_HTTP)
    port: int = setting("PORT", 9090, "port gunicorn binds", minimum=1, section=S_HTTP)
    workers: int = setting("WORKERS", 1, "gunicorn worker processes", minimum=1, section=S_HTTP)
    threads: int = setting("THREADS", 4, "threads per gunicorn worker", minimum=1, section=S_HTTP)
    gunicorn_timeout_s: int = setting(
        "GUNICORN_TIMEOUT",
        300,
        "seconds gunicorn lets a worker be silent before restarting it",
        minimum=1,
        section=S_HTTP,
    )
    basic_auth_user: str = setting("BASIC_AUTH_USER", "", "require HTTP basic auth on every route", section=S_HTTP)
    basic_auth_pass: str = setting(
        "BASIC_AUTH_PASS",
        "",
        "the basic-auth password; set both or neither (half of them refuses to start)",
        secret=True,
        section=S_HTTP,
    )
    bearer_token: str = setting(
        "BEARER_TOKEN", "", "accept `Authorization: Bearer <token>` (besides basic auth)", secret=True, section=S_HTTP
    )
    max_request_bytes: int = setting(
        "MAX_REQUEST_BYTES", 20 * 1024 * 1024, "largest request body", minimum=1, section=S_HTTP
    )
    max_tasks_per_request: int = setting(
        "MAX_TASKS_PER_REQUEST", 1000, "tasks in one `/predict`", minimum=1, section=S_HTTP
    )
    max_prompts_per_task: int = setting(
        "MAX_PROMPTS_PER_TASK", 100, "smart regions in one context", minimum=1, section=S_HTTP
    )
    model_ready_timeout_s: float = setting(
        "MODEL_READY_TIMEOUT",
        60.0,
        "seconds a `/predict` waits for models still loading before answering 503",
        minimum=0,
        section=S_HTTP,
    )
    predict_deadline_s: float = setting(
        "PREDICT_DEADLINE",
        90.0,
        "seconds a `/predict` may take before it answers what is done (Label Studio gives up at 100)",
        minimum=0.001,
        section=S_HTTP,
    )
    task_open_wait_s: float = setting(
        "TASK_OPEN_WAIT",
        2.0,
        "seconds the prediction for a task opened without one may take; a longer one goes on in the background and "
        "the task opens with none (the next open gets it)",
        minimum=0,
        section=S_HTTP,
    )
    predict_threads: int = setting(
        "PREDICT_THREADS",
        8,
        "model calls running at once per worker; more wait, and are dropped at their deadline",
        minimum=1,
        section=S_HTTP,
    )
    log_level: str = setting(
        "LOG_LEVEL",
        "INFO",
        "logging level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        section=S_HTTP,
    )

    sam_model_type: str = setting(
        "SAM_MODEL_TYPE",
        "vit_b",
        "the segmenter: Meta's SAM (`vit_*`), or SAM 2.1, EdgeTAM, SAM-HQ or SAM 3 (`sam3`) through transformers "
        "(docs/models.md compares them)",
        choices=SAM_TYPES + TRANSFORMERS_SEGMENTERS,
        section=S_MODELS,
    )
    sam_checkpoint: str = setting(
        "SAM_CHECKPOINT",
        "",
        "Meta's `.pth` checkpoint for a `vit_*` type, a transformers model folder for the others; used as it is; "
        "default: the official file or folder of `SAM_MODEL_TYPE` in `WEIGHTS_DIR`",
        section=S_MODELS,
    )
    hf_token: str = setting(
        "HF_TOKEN",
        "",
        "a Hugging Face access token (`hf_...`), sent by `python -m backend weights download` only to fetch a gated "
        "model (`sam3`: Meta approves each account at huggingface.co/facebook/sam3); empty: none",
        pattern=r"(hf_[A-Za-z0-9]{8,})?",
        secret=True,
        section=S_MODELS,
    )
    weights_dir: str = setting(
        "WEIGHTS_DIR",
        "./weights",
        "where the official weights are looked for and `python -m backend weights download` puts those missing",
        section=S_MODELS,
    )
    device: str = setting(
        "DEVICE",
        "auto",
        "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`",
        pattern=r"auto|cpu|cuda(:[0-9]+)?",
        section=S_MODELS,
    )
    decoder_runtime: str = setting(
        "DECODER_RUNTIME",
        "auto",
        "every segmenter's prompt decoder: `onnx` (ONNX Runtime, default on CPU) or `torch` (default on GPU)",
        choices=("auto", "onnx", "torch"),
        section=S_MODELS,
    )
    torch_threads: int = setting(
        "TORCH_THREADS", 0, "torch CPU threads per process; 0 keeps torch's default", minimum=0, section=S_MODELS
    )
    sam_encoder_batch: int = setting(
        "SAM_ENCODER_BATCH", 0, "images per SAM encoder pass; 0: 4 on a GPU, 1 on CPU", minimum=0, section=S_MODELS
    )

    detector: str = setting(
        "DETECTOR",
        "groundingdino-py",
        "the text-prompted detector: `groundingdino-py` (GroundingDINO's official checkpoint, as before), "
        "`grounding-dino` (transformers' GroundingDINO, no compiled extension), `mm-grounding-dino` "
        "(MM-GroundingDINO through transformers), `owlv2` (OWLv2 through transformers) or `sam3` (SAM 3: every "
        "instance of each label with its mask, no segmenter pass, from the folder `SAM_MODEL_TYPE=sam3` reads)",
        choices=DETECTORS,
        section=S_DETECTOR,
    )
    detector_model: str = setting(
        "DETECTOR_MODEL",
        "",
        "for the transformers detectors: a folder saved by `save_pretrained`, used as it is; default: the official "
        "repository's files at a pinned revision in `WEIGHTS_DIR`, which `python -m backend weights download` "
        "fetches (MM-GroundingDINO has no pinned revision yet: set it)",
        section=S_DETECTOR,
    )
    grounding_dino_config: str = setting(
        "GROUNDING_DINO_CONFIG",
        "",
        "model config matching the checkpoint; default: groundingdino-py's `GroundingDINO_SwinT_OGC.py`",
        section=S_DETECTOR,
    )
    grounding_dino_checkpoint: str = setting(
        "GROUNDING_DINO_CHECKPOINT",
        "",
        'checkpoint (`{"model": state_dict}`), used as it is; default: `WEIGHTS_DIR/groundingdino_swint_ogc.pth`',
        section=S_DETECTOR,
    )
    grounding_dino_text_encoder: str = setting(
        "GROUNDING_DINO_TEXT_ENCODER",
        "bert-base-uncased",
        "a local folder (config, vocab, weights); `bert-base-uncased` means `WEIGHTS_DIR/bert-base-uncased`, "
        "which `python -m backend weights download` fetches (no hub is contacted otherwise)",
        section=S_DETECTOR,
    )
    grounding_dino_image_size: int = setting(
        "GROUNDING_DINO_IMAGE_SIZE",
        800,
        "short side the GroundingDINO detectors read images at (OWLv2's processor fixes its own)",
        minimum=32,
        section=S_DETECTOR,
    )
    grounding_dino_batch: int = setting(
        "GROUNDING_DINO_BATCH",
        4,
        "images per detector pass in a pre-annotation batch",
        minimum=1,
        section=S_DETECTOR,
    )
    box_threshold: float = setting(
        "BOX_THRESHOLD",
        0.3,
        "a box is kept when its best token (OWLv2: phrase) scores above this",
        minimum=0,
        section=S_DETECTOR,
    )
    text_threshold: float = setting(
        "TEXT_THRESHOLD",
        0.25,
        "... and the mean token score of its phrase is above this",
        minimum=0,
        section=S_DETECTOR,
    )
    max_objects: int = setting(
        "MAX_OBJECTS",
        20,
        "objects kept per image (best first, after NMS within each label) before SAM",
        minimum=1,
        section=S_DETECTOR,
    )

    mask_regions: str = setting(
        "MASK_REGIONS",
        "polygon",
        "for a label that both a PolygonLabels and a BrushLabels control have, what SAM's mask becomes: a polygon "
        "(what COCO and YOLO exports carry), a brush, or both",
        choices=("polygon", "brush", "both"),
        section=S_REGIONS,
    )
    polygon_tolerance: float = setting(
        "POLYGON_TOLERANCE",
        1.0,
        "Douglas-Peucker tolerance in pixels when a mask becomes polygons (halved for a part the polygon would "
        'cover at IoU < 0.95); a project\'s `<Number name="polygon_tolerance" defaultValue="...">` overrides it',
        minimum=0,
        section=S_REGIONS,
    )
    polygon_min_area: int = setting(
        "POLYGON_MIN_AREA",
        10,
        "pixels a connected part of a mask needs to become a polygon (smaller specks are dropped)",
        minimum=1,
        section=S_REGIONS,
    )
    polygon_max_vertices: int = setting(
        "POLYGON_MAX_VERTICES",
        1000,
        "vertices per polygon; a more ragged outline is simplified further until it fits",
        minimum=3,
        section=S_REGIONS,
    )
    polygon_max_task_vertices: int = setting(
        "POLYGON_MAX_TASK_VERTICES",
        20000,
        "vertices of all polygons of one task's answer (about 20 bytes each); the largest parts are kept first",
        minimum=3,
        section=S_REGIONS,
    )
    max_answer_bytes: int = setting(
        "MAX_ANSWER_BYTES",
        2_000_000,
        "bytes of one task's answer as JSON (what Label Studio stores as its prediction); past it the regions of the "
        "least confident objects are left out, with a log line (docs/preannotation.md has sizes of real masks); "
        "the smart tools' answers are not capped",
        minimum=1000,
        section=S_REGIONS,
    )

    video_model: str = setting(
        "VIDEO_MODEL",
        "sam2.1-hiera-tiny",
        "the video predictor that tracks boxes through `<Video>` tasks: SAM 2.1, EdgeTAM (made for video on small "
        "devices) or SAM 3's tracker (docs/video.md)",
        choices=VIDEO_MODELS,
        section=S_VIDEO,
    )
    video_checkpoint: str = setting(
        "VIDEO_CHECKPOINT",
        "",
        "the video predictor's transformers model folder, used as it is; default: the official folder of "
        "`VIDEO_MODEL` in `WEIGHTS_DIR` (SAM 2.1's and SAM 3's are the folders the segmenter reads too)",
        section=S_VIDEO,
    )
    max_video_frames: int = setting(
        "MAX_VIDEO_FRAMES",
        3000,
        "most frames a video may have (its container's header is read first: a longer one is refused before "
        "any frame is decoded)",
        minimum=1,
        section=S_VIDEO,
    )
    max_video_pixels: int = setting(
        "MAX_VIDEO_PIXELS",
        1920 * 1080,
        "largest video frame (width × height) decoded; larger is refused before decoding",
        minimum=1,
        section=S_VIDEO,
    )
    max_video_bytes: int = setting(
        "MAX_VIDEO_BYTES", 500 * 1024 * 1024, "largest video file downloaded", minimum=1, section=S_VIDEO
    )
    video_download_timeout_s: float = setting(
        "VIDEO_DOWNLOAD_TIMEOUT",
        300.0,
        "seconds a video download may take in all (written to a temporary file as it arrives)",
        minimum=0.001,
        section=S_VIDEO,
    )
    video_keyframe_tolerance: float = setting(
        "VIDEO_KEYFRAME_TOLERANCE",
        0.25,
        "a tracked box Label Studio's interpolation between the boxes kept around it reproduces within this many "
        "percent of the frame is left out of the track (fewer keyframes to correct, a smaller answer); 0 keeps a box "
        "on every frame",
        minimum=0,
        section=S_VIDEO,
    )
    max_video_objects: int = setting(
        "MAX_VIDEO_OBJECTS",
        20,
        "most objects one video track follows (each costs a memory bank and a decoder pass per frame)",
        minimum=1,
        section=S_VIDEO,
    )
    video_detect_every: int = setting(
        "VIDEO_DETECT_EVERY",
        25,
        "zero-click video pre-annotation (a task with nothing drawn): the project's labels are detected on every "
        "this many decoded frames, from the first (25: once a second of a 25 fps video); more often finds objects "
        "sooner and links them surer, at one detector pass a time",
        minimum=1,
        section=S_VIDEO,
    )

    redis_url: str = setting(
        "REDIS_URL",
        "",
        "shared cache, locks and (with `INFERENCE=queue`) the job queue, which must never be evicted "
        "(`maxmemory-policy noeviction`); without it an in-process cache is used",
        section=S_CACHE,
    )
    cache_redis_url: str = setting(
        "CACHE_REDIS_URL",
        "",
        "the Redis of embeddings and prompt sessions, which may evict (`allkeys-lru`); default: `REDIS_URL`",
        section=S_CACHE,
    )
    embedding_ttl_s: int = setting(
        "EMBEDDING_TTL", 7 * 24 * 3600, "seconds an image embedding is kept", minimum=1, section=S_CACHE
    )
    session_ttl_s: int = setting(
        "SESSION_TTL",
        2 * 3600,
        "seconds the remembered boxes and logits of a task and label are kept",
        minimum=1,
        section=S_CACHE,
    )
    memory_cache_bytes: int = setting(
        "MEMORY_CACHE_BYTES",
        512 * 1024 * 1024,
        "bound of the in-process cache (also the fallback while Redis is down)",
        minimum=0,
        section=S_CACHE,
    )
    prefetch_tasks: int = setting(
        "PREFETCH_TASKS",
        3,
        "a request for a task encodes the images of this many imported tasks after it in the background "
        "(Label Studio's order: ascending id), skipping those cached; 0: no prefetch",
        minimum=0,
        section=S_CACHE,
    )
    encode_on_import: bool = setting(
        "ENCODE_ON_IMPORT",
        True,
        "encode the images of the tasks Label Studio imports (TASKS_CREATED webhook) in the background; false: the "
        "imports are recorded and their images encoded only by prefetch (PREFETCH_TASKS) and `/encode`",
        section=S_CACHE,
    )
    encode_lock_timeout_s: float = setting(
        "ENCODE_LOCK_TIMEOUT",
        120.0,
        "seconds other workers wait for one worker's encoding of the same image",
        minimum=0,
        section=S_CACHE,
    )

    inference: str = setting(
        "INFERENCE",
        "local",
        "where the models run: in the web process, or on RQ workers through Redis",
        choices=("local", "queue"),
        section=S_QUEUE,
    )
    job_timeout_s: int = setting("JOB_TIMEOUT", 180, "seconds a job may run on a worker", minimum=1, section=S_QUEUE)
    worker_ttl_s: int = setting(
        "WORKER_TTL",
        20,
        "seconds after which a silent worker counts as gone; its jobs' leases lapse 5 s later",
        minimum=1,
        section=S_QUEUE,
    )
    worker_maintenance_s: int = setting(
        "WORKER_MAINTENANCE_INTERVAL",
        10,
        "seconds between a worker's registry clean-ups (abandoned-job retries)",
        minimum=1,
        section=S_QUEUE,
    )
    interactive_thread: bool = setting(
        "INTERACTIVE_THREAD",
        True,
        "each worker process also runs a loop for clicks (and for encoding ahead while the other is in a batch or a "
        "training), so no click waits for a batch",
        section=S_QUEUE,
    )
    preannotate_batch: int = setting(
        "PREANNOTATE_BATCH",
        4,
        "pre-annotation jobs a worker takes from the queue at once (1: one at a time)",
        minimum=1,
        section=S_QUEUE,
    )

    model_dir: str = setting("MODEL_DIR", "./models", "trained models and training data", section=S_TRAINING)
    model_version: str = setting(
        "MODEL_VERSION",
        "",
        "the `model_version` reported to Label Studio; default `sam-<type>`; a project's "
        "fine-tuned decoder reports `<MODEL_VERSION>-p<project>-v<N>`; with `INFERENCE=queue` the web tier reports "
        "the workers' (each publishes its own in its RQ registration)",
        section=S_TRAINING,
    )
    train_after_annotations: int = setting(
        "TRAIN_AFTER_ANNOTATIONS",
        10,
        "train a project after this many new annotations with masks; 0: only on *Start training*",
        minimum=0,
        section=S_TRAINING,
    )
    train_steps: int = setting("TRAIN_STEPS", 200, "optimiser steps of one training", minimum=1, section=S_TRAINING)
    train_batch_size: int = setting("TRAIN_BATCH_SIZE", 4, "masks per step", minimum=1, section=S_TRAINING)
    train_learning_rate: float = setting(
        "TRAIN_LEARNING_RATE", 1e-4, "AdamW learning rate (weight decay 0.01)", minimum=0, section=S_TRAINING
    )
    train_correction_rounds: int = setting(
        "TRAIN_CORRECTION_ROUNDS",
        2,
        "simulated correction clicks per mask after the first prompt",
        minimum=0,
        section=S_TRAINING,
    )
    train_held_out_fraction: float = setting(
        "TRAIN_HELD_OUT_FRACTION",
        0.2,
        "share of a project's tasks held out to score each new version (at least one)",
        minimum=0,
        section=S_TRAINING,
    )
    train_max_regions: int = setting(
        "TRAIN_MAX_REGIONS",
        100,
        "mask regions (brushes, polygons) one annotation may hold; one with more is left out whole, undecoded, "
        "and listed in `/versions`' rejections",
        minimum=1,
        section=S_TRAINING,
    )
    train_max_annotation_pixels: int = setting(
        "TRAIN_MAX_ANNOTATION_PIXELS",
        200_000_000,
        "pixels one annotation's mask regions may declare in all (each region's `original_width` × "
        "`original_height`); over it the annotation is left out whole, undecoded. Reading it holds an eighth of a "
        "byte per pixel, plus five bytes per pixel of the region being decoded",
        minimum=1,
        section=S_TRAINING,
    )
    train_features_max_mb: int = setting(
        "TRAIN_FEATURES_MAX_MB",
        4096,
        "MB of annotated images' embeddings kept on disk per project (`MODEL_DIR/<project>/features`), so that a "
        "training does not encode them again: 2 MiB an image for SAM ViT, 10 MiB for SAM 3 (docs/models.md). An "
        "image beyond it is encoded again by each training",
        minimum=0,
        section=S_TRAINING,
    )
    trainings_at_once: int = setting(
        "TRAININGS_AT_ONCE",
        1,
        "trainings one process runs at the same time; further projects wait their turn. Each holds a copy of "
        "SAM's prompt encoder and mask decoder with its optimiser, and one annotation's masks at a time",
        minimum=1,
        section=S_TRAINING,
    )
    train_lock_ttl_s: float = setting(
        "TRAIN_LOCK_TTL", 60.0, "seconds a dead training's Redis lock outlives it", minimum=1, section=S_TRAINING
    )
    train_job_timeout_s: int = setting(
        "TRAIN_JOB_TIMEOUT",
        3600,
        "seconds a training may run on a queue worker (`INFERENCE=queue`)",
        minimum=1,
        section=S_TRAINING,
    )
    model_version_pin: str = setting(
        "MODEL_VERSION_PIN",
        "",
        "rollback: `1=v2,3=base` serves version v2 to project 1 and the original SAM to "
        "project 3; a bare `v2` or `base` pins every project",
        section=S_TRAINING,
    )

    def __post_init__(self) -> None:
        for definition in dataclasses.fields(self):
            _check(definition, getattr(self, definition.name))
        if self.inference == "queue" and not self.redis_url:
            raise SettingsError("INFERENCE=queue needs REDIS_URL: the job queue lives in Redis")
        # Half a credential would leave every route open (no user) or accept `user:` (no password).
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            missing = "BASIC_AUTH_PASS" if self.basic_auth_user else "BASIC_AUTH_USER"
            raise SettingsError(
                f"BASIC_AUTH_USER and BASIC_AUTH_PASS go together, but {missing} is empty: "
                "set both to require basic auth, or neither"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings in `environ` (default: the process's environment); an empty variable means unset."""
        environ = os.environ if environ is None else environ
        values: dict[str, typing.Any] = {}  # each of its own field's type, which `_parse` reads from the field
        for definition in dataclasses.fields(cls):
            raw = environ.get(definition.metadata["env"], "").strip()
            if raw:
                values[definition.name] = _parse(definition, raw)
        return cls(**values)

    @property
    def base_model_version(self) -> str:
        """The name predictions of the loaded SAM carry; fine-tuned versions extend it."""
        return self.model_version or f"sam-{self.sam_model_type}"

    @property
    def cache_url(self) -> str:
        """The Redis of cached embeddings and prompt sessions: CACHE_REDIS_URL, else REDIS_URL."""
        return self.cache_redis_url or self.redis_url


_TYPES = typing.get_type_hints(Settings)


def _parse(definition: dataclasses.Field, raw: str) -> object:
    env, kind = definition.metadata["env"], _TYPES[definition.name]
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{env} must be true or false, got {raw!r}")
    if kind is int or kind is float:
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{env} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if typing.get_origin(kind) is tuple:
        return tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    if definition.name == "label_studio_url":
        return raw.rstrip("/")
    if definition.metadata["choices"] and definition.name != "log_level":
        return raw.lower()
    return raw.upper() if definition.name == "log_level" else raw


def _check(definition: dataclasses.Field, value: object) -> None:
    env, choices, minimum, pattern = (definition.metadata[key] for key in ("env", "choices", "minimum", "pattern"))
    if choices and value not in choices:
        raise SettingsError(f"{env} must be one of {', '.join(choices)}; got {value!r}")
    if pattern and not re.fullmatch(pattern, str(value)):
        shown = "a value" if not definition.repr else repr(value)  # a secret is never echoed
        raise SettingsError(f"{env} got {shown}; it accepts {definition.metadata['doc']}")
    if minimum is not None and isinstance(value, int | float) and value < minimum:
        raise SettingsError(f"{env} must be at least {minimum:g}, got {value!r}")


def describe_markdown() -> str:
    """docs/configuration.md: every setting, by section, from the fields' own metadata."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable, read once at start-up (`backend/config.py`); an empty value",
        "means unset. A value that cannot be used stops the process with a message naming the variable.",
        "This file is generated by `python -m backend settings --markdown > docs/configuration.md`; a test",
        "checks that it matches the code.",
    ]
    section = None
    for definition in dataclasses.fields(Settings):
        meta = definition.metadata
        if meta["section"] != section:
            section = meta["section"]
            lines += ["", f"## {section}", "", "| variable | default | meaning |", "|---|---|---|"]
        meaning = meta["doc"]
        if meta["choices"]:
            meaning += f" (one of: {', '.join(f'`{choice}`' for choice in meta['choices'])})"
        lines.append(f"| `{meta['env']}` | {shown_default(definition.default)} | {meaning} |")
    return "\n".join(lines) + "\n"


def shown_default(default: object) -> str:
    if default in ("", ()):
        return "–"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        return f"`{','.join(default)}`"
    return f"`{default}`"
