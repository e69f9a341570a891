"""Model weights: where the backend looks for them, the official files `python -m backend weights download`
fetches (each at a pinned address, checked by SHA-256), and the errors that say what to do when one is absent,
cannot be fetched, or is not the file it should be.

Nothing here contacts a server unless a download is asked for. A download goes to a temporary file that is
renamed only once complete (and, for weights, once its SHA-256 matches), so a half-downloaded or corrupted
file is never loaded; a file already in place is the user's and is used as it is, never fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests

from backend.errors import CheckpointMissing, DownloadFailed

log = logging.getLogger(__name__)

WEIGHTS_COMMAND = "python -m backend weights download"
HUGGING_FACE = "https://huggingface.co"


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One published checkpoint file."""

    filename: str
    url: str
    sha256: str
    size_mb: int


@dataclass(frozen=True)
class OfficialTextEncoder:
    """A Hugging Face model repository at a pinned commit: the files GroundingDINO's tokenizer and BERT read,
    the weights checked by SHA-256 (the small files are fixed by the commit)."""

    name: str  # what GROUNDING_DINO_TEXT_ENCODER says to mean it; also its folder in WEIGHTS_DIR
    repo: str
    revision: str
    files: tuple[str, ...]
    weights: str
    weights_sha256: str
    size_mb: int

    def url(self, filename: str, endpoint: str = HUGGING_FACE) -> str:
        return f"{endpoint}/{self.repo}/resolve/{self.revision}/{filename}"


SAM_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "vit_b": OfficialCheckpoint(
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375,
    ),
    "vit_l": OfficialCheckpoint(
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1250,
    ),
    "vit_h": OfficialCheckpoint(
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2560,
    ),
}

# The SwinT OGC model that GROUNDING_DINO_CONFIG's default (the package's GroundingDINO_SwinT_OGC.py) describes.
GROUNDING_DINO_CHECKPOINT = OfficialCheckpoint(
    "groundingdino_swint_ogc.pth",
    "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth",
    "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799",
    694,
)

# GroundingDINO's text encoder, the BERT its checkpoint was trained with.
BERT_BASE_UNCASED = OfficialTextEncoder(
    name="bert-base-uncased",
    repo="google-bert/bert-base-uncased",
    revision="86b5e0934494bd15c9632b12f734a8a67f723594",
    files=("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"),
    weights="model.safetensors",
    weights_sha256="68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3",
    size_mb=440,
)


@dataclass(frozen=True)
class OfficialModelFolder:
    """A segmenter published as a Hugging Face model repository in transformers' format, fetched whole by
    huggingface_hub at `revision` and checked (its config names the expected model, its weights are there)."""

    repo: str
    revision: str  # a branch until a commit is pinned: the commit ids were not reachable when this was written
    family: str  # the transformers model family (backend/models/hf_segmenter.py FAMILIES)
    size_mb: int


# Official repositories: Meta's SAM 2.1 conversions, the EdgeTAM conversion transformers' docs use, and the
# SAM-HQ authors' (SysCV) community conversions.
TRANSFORMERS_MODELS: dict[str, OfficialModelFolder] = {
    "sam2.1-hiera-tiny": OfficialModelFolder("facebook/sam2.1-hiera-tiny", "main", "sam2", 156),
    "sam2.1-hiera-small": OfficialModelFolder("facebook/sam2.1-hiera-small", "main", "sam2", 184),
    "sam2.1-hiera-base-plus": OfficialModelFolder("facebook/sam2.1-hiera-base-plus", "main", "sam2", 324),
    "sam2.1-hiera-large": OfficialModelFolder("facebook/sam2.1-hiera-large", "main", "sam2", 898),
    "edgetam": OfficialModelFolder("yonigozlan/EdgeTAM-hf", "main", "edgetam", 55),
    "sam-hq-vit-b": OfficialModelFolder("syscv-community/sam-hq-vit-base", "main", "sam_hq", 379),
    "sam-hq-vit-l": OfficialModelFolder("syscv-community/sam-hq-vit-large", "main", "sam_hq", 1250),
    "sam-hq-vit-h": OfficialModelFolder("syscv-community/sam-hq-vit-huge", "main", "sam_hq", 2570),
}


@dataclass(frozen=True)
class CheckpointLocation:
    """Where the backend looks for one model's weights and which setting decides it. `official` is what
    `weights download` puts at `path` when the setting is left unset; None when the setting names the user's own
    file or folder, which no download would replace."""

    what: str  # "SAM", "GroundingDINO", "text encoder"
    setting: str  # the variable that points at a local file instead
    path: Path
    official: OfficialCheckpoint | OfficialTextEncoder | OfficialModelFolder | None

    def describe(self) -> str:
        if self.official is None:
            return f"{self.setting}={self.path}"
        return f"{self.path} (the official file in WEIGHTS_DIR that {self.setting} defaults to)"


def missing_checkpoint(location: CheckpointLocation) -> CheckpointMissing:
    """The error for absent weights: the setting and the file it expected, and only a remedy that would work."""
    if location.official is None:
        return CheckpointMissing(
            f"{location.what} weights not found: {location.setting}={location.path} does not exist; "
            f"point {location.setting} at an existing file"
        )
    return CheckpointMissing(
        f"{location.what} weights not found at {location.path}, the official file in WEIGHTS_DIR that "
        f"{location.setting} defaults to; fetch it with `{WEIGHTS_COMMAND}` or set {location.setting} to a copy "
        "you have"
    )


def sha256_of(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, sha256: str | None, timeout_s: float) -> None:
    """`url` into `target`, all or nothing; with `sha256`, only when the bytes match it."""
    digest = hashlib.sha256()
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, requests.get(url, stream=True, timeout=timeout_s) as response:
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1024 * 1024):
                out.write(chunk)
                digest.update(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(f"checksum mismatch for {url}: got {digest.hexdigest()}, expected {sha256}")
        os.replace(partial_name, target)
    finally:
        if os.path.exists(partial_name):
            os.unlink(partial_name)


def _unreachable(location: CheckpointLocation, url: str, error: requests.RequestException, elsewhere: str) -> str:
    """One line: what was tried, the setting that takes a local copy, the command that fetches it elsewhere."""
    reason = type(error).__name__
    if isinstance(error, requests.HTTPError) and error.response is not None:
        reason = f"HTTP {error.response.status_code}"
    return (
        f"could not download {location.what} weights from {url} ({reason}); set {location.setting} to a local "
        f"copy, or fetch it on a machine with access: {elsewhere}"
    )


def download_checkpoint(location: CheckpointLocation, timeout_s: float = 60.0) -> Path:
    """Fetch `location`'s official file into place unless a file is already there, which is used as it is."""
    official = location.official
    if location.path.exists() or official is None:
        return location.path
    if isinstance(official, OfficialTextEncoder):
        return download_text_encoder(location, official, timeout_s=timeout_s)
    if isinstance(official, OfficialModelFolder):
        return download_model_folder(location, official)
    location.path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%d MB) from %s", official.filename, official.size_mb, official.url)
    try:
        _download(official.url, location.path, official.sha256, timeout_s)
    except requests.RequestException as error:
        elsewhere = f"curl -L --create-dirs -o {location.path} {official.url}"
        raise DownloadFailed(_unreachable(location, official.url, error, elsewhere)) from error
    return location.path


def download_text_encoder(
    location: CheckpointLocation,
    encoder: OfficialTextEncoder,
    endpoint: str = HUGGING_FACE,
    timeout_s: float = 60.0,
) -> Path:
    """`encoder`'s files at its pinned revision into the folder `location.path`, which appears only once every
    file is in and the weights' SHA-256 matches."""
    folder = location.path
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".part"))
    log.info("downloading %s (%d MB) at revision %s", encoder.repo, encoder.size_mb, encoder.revision)
    try:
        for filename in (*encoder.files, encoder.weights):
            url = encoder.url(filename, endpoint)
            checksum = encoder.weights_sha256 if filename == encoder.weights else None
            try:
                _download(url, staging / filename, checksum, timeout_s)
            except requests.RequestException as error:
                elsewhere = (
                    f"huggingface-cli download {encoder.repo} {' '.join((*encoder.files, encoder.weights))} "
                    f"--revision {encoder.revision} --local-dir {folder}"
                )
                raise DownloadFailed(_unreachable(location, url, error, elsewhere)) from error
        os.replace(staging, folder)
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return folder


def download_model_folder(location: CheckpointLocation, model: OfficialModelFolder) -> Path:
    """`model`'s repository at its revision into the folder `location.path`, which appears only once the
    download is complete and `check_model_folder` accepts it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folder = location.path
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".part"))
    log.info("downloading %s (%d MB) at revision %s", model.repo, model.size_mb, model.revision)
    try:
        try:
            snapshot_download(model.repo, revision=model.revision, local_dir=staging)
        except (HfHubHTTPError, LocalEntryNotFoundError, requests.RequestException, OSError) as error:
            raise DownloadFailed(
                f"could not download {location.what} weights from {HUGGING_FACE}/{model.repo} at revision "
                f"{model.revision} ({type(error).__name__}); set {location.setting} to a local copy, or fetch it on "
                f"a machine with access: huggingface-cli download {model.repo} --revision {model.revision} "
                f"--local-dir {folder}"
            ) from error
        check_model_folder(staging, model)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_model_folder(folder: Path, model: OfficialModelFolder) -> None:
    """ValueError unless `folder` holds `model`: its config's model_type, its weights and its processor."""
    import json

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{model.repo} at {model.revision} has no readable config.json: {error}") from error
    if model_type != model.family:
        raise ValueError(f"{model.repo} at {model.revision} holds a {model_type!r} model, not a {model.family} one")
    missing = [name for name in ("model.safetensors", "preprocessor_config.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{model.repo} at {model.revision} lacks {', '.join(missing)}")
