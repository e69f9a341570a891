"""All configuration, read once from environment variables with documented defaults.

Names follow label-studio-ml's where they exist (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
BASIC_AUTH_USER, BASIC_AUTH_PASS, MODEL_DIR, WORKERS, THREADS, LOG_LEVEL). The README's
configuration table is the user-facing copy of this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be true or false, got {raw!r}")


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Everything the backend can be told; `Settings.from_env()` is the only reader of os.environ."""

    # Label Studio connection (image downloads).
    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    local_files_document_root: str = ""
    allowed_image_hosts: tuple[str, ...] = ()
    allow_private_image_hosts: bool = False  # may ALLOWED_IMAGE_HOSTS resolve to private/loopback addresses
    download_timeout_s: float = 10.0
    max_download_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000

    # HTTP server.
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    bearer_token: str = field(default="", repr=False)
    max_request_bytes: int = 20 * 1024 * 1024
    max_tasks_per_request: int = 1000
    max_prompts_per_task: int = 100
    model_ready_timeout_s: float = 60.0
    predict_deadline_s: float = 90.0  # below Label Studio's 100 s, so it gets our answer, not its timeout
    predict_threads: int = 8
    log_level: str = "INFO"

    # SAM.
    sam_model_type: str = "vit_b"
    sam_checkpoint: str = ""
    device: str = "auto"
    decoder_runtime: str = "auto"
    torch_threads: int = 0
    sam_encoder_batch: int = 0  # images per SAM encoder pass; 0: 4 on a GPU, 1 on CPU

    # GroundingDINO (pre-annotation and text prompts); optional: SAM serves clicks without it.
    grounding_dino_config: str = ""
    grounding_dino_checkpoint: str = ""
    grounding_dino_text_encoder: str = "bert-base-uncased"
    grounding_dino_image_size: int = 800
    grounding_dino_batch: int = 4
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    max_objects: int = 20

    # Redis: REDIS_URL holds the job queue and the locks, which must never be evicted; the embedding cache, which
    # may be, goes to CACHE_REDIS_URL when it is set (see `cache_url`).
    redis_url: str = ""
    cache_redis_url: str = ""
    embedding_ttl_s: int = 7 * 24 * 3600
    session_ttl_s: int = 2 * 3600
    memory_cache_bytes: int = 512 * 1024 * 1024
    encode_lock_timeout_s: float = 120.0

    # Where the models run: "local" (in the web process) or "queue" (RQ workers through Redis).
    inference: str = "local"
    job_timeout_s: int = 180
    worker_ttl_s: int = 20
    worker_maintenance_s: int = 10
    interactive_thread: bool = True  # each worker also runs a clicks-only loop, so no click waits for a batch
    preannotate_batch: int = 4  # pre-annotation jobs a worker takes from the queue at once (1: one at a time)

    # Storage of trained models and weights.
    model_dir: str = "./models"
    weights_dir: str = "./weights"
    model_version: str = ""

    # Active learning (fine-tuning the prompt encoder and mask decoder on the project's annotations).
    train_after_annotations: int = 10
    train_steps: int = 200
    train_batch_size: int = 4
    train_learning_rate: float = 1e-4
    train_correction_rounds: int = 2
    train_held_out_fraction: float = 0.2
    train_lock_ttl_s: float = 60.0
    train_job_timeout_s: int = 3600
    model_version_pin: str = ""

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            label_studio_url=_env_str("LABEL_STUDIO_URL").rstrip("/"),
            label_studio_api_key=_env_str("LABEL_STUDIO_API_KEY"),
            local_files_document_root=_env_str("LOCAL_FILES_DOCUMENT_ROOT"),
            allowed_image_hosts=_env_list("ALLOWED_IMAGE_HOSTS"),
            allow_private_image_hosts=_env_bool("ALLOW_PRIVATE_IMAGE_HOSTS", cls.allow_private_image_hosts),
            download_timeout_s=_env_float("DOWNLOAD_TIMEOUT", cls.download_timeout_s),
            max_download_bytes=_env_int("MAX_DOWNLOAD_BYTES", cls.max_download_bytes),
            max_image_pixels=_env_int("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            basic_auth_user=_env_str("BASIC_AUTH_USER"),
            basic_auth_pass=_env_str("BASIC_AUTH_PASS"),
            bearer_token=_env_str("BEARER_TOKEN"),
            max_request_bytes=_env_int("MAX_REQUEST_BYTES", cls.max_request_bytes),
            max_tasks_per_request=_env_int("MAX_TASKS_PER_REQUEST", cls.max_tasks_per_request),
            max_prompts_per_task=_env_int("MAX_PROMPTS_PER_TASK", cls.max_prompts_per_task),
            model_ready_timeout_s=_env_float("MODEL_READY_TIMEOUT", cls.model_ready_timeout_s),
            predict_deadline_s=_env_float("PREDICT_DEADLINE", cls.predict_deadline_s),
            predict_threads=_env_int("PREDICT_THREADS", cls.predict_threads),
            log_level=_env_str("LOG_LEVEL", cls.log_level).upper(),
            sam_model_type=_env_str("SAM_MODEL_TYPE", cls.sam_model_type),
            sam_checkpoint=_env_str("SAM_CHECKPOINT"),
            device=_env_str("DEVICE", cls.device),
            decoder_runtime=_env_str("DECODER_RUNTIME", cls.decoder_runtime),
            torch_threads=_env_int("TORCH_THREADS", cls.torch_threads),
            sam_encoder_batch=_env_int("SAM_ENCODER_BATCH", cls.sam_encoder_batch),
            grounding_dino_config=_env_str("GROUNDING_DINO_CONFIG"),
            grounding_dino_checkpoint=_env_str("GROUNDING_DINO_CHECKPOINT"),
            grounding_dino_text_encoder=_env_str("GROUNDING_DINO_TEXT_ENCODER", cls.grounding_dino_text_encoder),
            grounding_dino_image_size=_env_int("GROUNDING_DINO_IMAGE_SIZE", cls.grounding_dino_image_size),
            grounding_dino_batch=_env_int("GROUNDING_DINO_BATCH", cls.grounding_dino_batch),
            box_threshold=_env_float("BOX_THRESHOLD", cls.box_threshold),
            text_threshold=_env_float("TEXT_THRESHOLD", cls.text_threshold),
            max_objects=_env_int("MAX_OBJECTS", cls.max_objects),
            redis_url=_env_str("REDIS_URL"),
            cache_redis_url=_env_str("CACHE_REDIS_URL"),
            embedding_ttl_s=_env_int("EMBEDDING_TTL", cls.embedding_ttl_s),
            session_ttl_s=_env_int("SESSION_TTL", cls.session_ttl_s),
            memory_cache_bytes=_env_int("MEMORY_CACHE_BYTES", cls.memory_cache_bytes),
            encode_lock_timeout_s=_env_float("ENCODE_LOCK_TIMEOUT", cls.encode_lock_timeout_s),
            inference=_env_str("INFERENCE", cls.inference).lower(),
            job_timeout_s=_env_int("JOB_TIMEOUT", cls.job_timeout_s),
            worker_ttl_s=_env_int("WORKER_TTL", cls.worker_ttl_s),
            worker_maintenance_s=_env_int("WORKER_MAINTENANCE_INTERVAL", cls.worker_maintenance_s),
            interactive_thread=_env_bool("INTERACTIVE_THREAD", cls.interactive_thread),
            preannotate_batch=_env_int("PREANNOTATE_BATCH", cls.preannotate_batch),
            model_dir=_env_str("MODEL_DIR", cls.model_dir),
            weights_dir=_env_str("WEIGHTS_DIR", cls.weights_dir),
            model_version=_env_str("MODEL_VERSION"),
            train_after_annotations=_env_int("TRAIN_AFTER_ANNOTATIONS", cls.train_after_annotations),
            train_steps=_env_int("TRAIN_STEPS", cls.train_steps),
            train_batch_size=_env_int("TRAIN_BATCH_SIZE", cls.train_batch_size),
            train_learning_rate=_env_float("TRAIN_LEARNING_RATE", cls.train_learning_rate),
            train_correction_rounds=_env_int("TRAIN_CORRECTION_ROUNDS", cls.train_correction_rounds),
            train_held_out_fraction=_env_float("TRAIN_HELD_OUT_FRACTION", cls.train_held_out_fraction),
            train_lock_ttl_s=_env_float("TRAIN_LOCK_TTL", cls.train_lock_ttl_s),
            train_job_timeout_s=_env_int("TRAIN_JOB_TIMEOUT", cls.train_job_timeout_s),
            model_version_pin=_env_str("MODEL_VERSION_PIN"),
        )

    @property
    def base_model_version(self) -> str:
        """The name predictions of the loaded SAM carry; fine-tuned versions extend it."""
        return self.model_version or f"sam-{self.sam_model_type}"

    @property
    def cache_url(self) -> str:
        """The Redis of cached embeddings and prompt sessions: CACHE_REDIS_URL, else REDIS_URL."""
        return self.cache_redis_url or self.redis_url

    @property
    def sam_checkpoint_path(self) -> Path:
        """The SAM checkpoint to load: SAM_CHECKPOINT, else the official file name in WEIGHTS_DIR."""
        if self.sam_checkpoint:
            return Path(self.sam_checkpoint)
        from backend.models.checkpoints import SAM_CHECKPOINTS

        return Path(self.weights_dir) / SAM_CHECKPOINTS[self.sam_model_type].filename

    @property
    def grounding_dino_checkpoint_path(self) -> Path:
        """GROUNDING_DINO_CHECKPOINT, else the official file name in WEIGHTS_DIR."""
        if self.grounding_dino_checkpoint:
            return Path(self.grounding_dino_checkpoint)
        from backend.models.checkpoints import GROUNDING_DINO_CHECKPOINT

        return Path(self.weights_dir) / GROUNDING_DINO_CHECKPOINT.filename
