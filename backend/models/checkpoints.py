"""Model weights: where the backend looks for them, the official files `python -m backend weights download`
fetches (each at a pinned address, checked by SHA-256), and the errors that say what to do when one is absent,
cannot be fetched, or is not the file it should be.

Nothing here contacts a server unless a download is asked for. A download goes to a temporary file that is
renamed only once complete (and, for weights, once its SHA-256 matches), so a half-downloaded or corrupted
file is never loaded; a file already in place is the user's and is used as it is, never fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests

from backend.errors import CheckpointMissing, DownloadFailed, WrongCheckpoint

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
class OfficialRepository:
    """A Hugging Face model repository in transformers' format, the one kind of official model folder (segmenters,
    detectors, the text encoder): `files` and `weights` at `revision`, a full commit id where one is known (else a
    branch, logged as unpinned). Without a SHA-256 published here, the weights are checked against the one the hub
    states for that revision's file (its X-Linked-Etag header); the folder must also hold a `model_type` model."""

    name: str  # its folder in WEIGHTS_DIR (and, for the text encoder, what GROUNDING_DINO_TEXT_ENCODER says)
    repo: str
    revision: str
    model_type: str  # config.json's model_type; for segmenters, the family in backend/models/hf_segmenter.py
    files: tuple[str, ...]  # besides the weights: config.json and what the tokenizer and processor read
    weights: str
    weights_sha256: str | None
    size_mb: int
    # Downloads granted by the owner's approval, per account: fetched with HF_TOKEN (see `download_repository`).
    gated: bool = False

    def url(self, filename: str, endpoint: str = HUGGING_FACE) -> str:
        return f"{endpoint}/{self.repo}/resolve/{self.revision}/{filename}"

    @property
    def pinned(self) -> bool:
        return re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None


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
BERT_BASE_UNCASED = OfficialRepository(
    name="bert-base-uncased",
    repo="google-bert/bert-base-uncased",
    revision="86b5e0934494bd15c9632b12f734a8a67f723594",
    model_type="bert",
    files=("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"),
    weights="model.safetensors",
    weights_sha256="68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3",
    size_mb=440,
)

# Meta's SAM 3 (detector and tracker, one image encoder) in transformers' format, beside Meta's own sam3.pt, under
# Meta's SAM License. Gated: Meta approves each account. The processor config is transformers 5's combined
# processor_config.json; the CLIP tokenizer's files serve the detector's text prompts. The commit is the one public
# code pins for this repository in many places.
SAM3 = OfficialRepository(
    name="sam3",
    repo="facebook/sam3",
    revision="3c879f39826c281e95690f02c7821c4de09afae7",
    model_type="sam3_video",
    files=(
        "config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ),
    weights="model.safetensors",
    weights_sha256=None,
    size_mb=3450,
    gated=True,
)


# The transformers detectors' official repositories (DETECTOR); MM-GroundingDINO's revision is not pinned yet.
DETECTOR_REPOSITORIES: dict[str, OfficialRepository] = {
    "grounding-dino": OfficialRepository(
        name="grounding-dino-tiny",
        repo="IDEA-Research/grounding-dino-tiny",
        revision="a2bb814dd30d776dcf7e30523b00659f4f141c71",
        model_type="grounding-dino",
        files=(
            "config.json",
            "preprocessor_config.json",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.txt",
        ),
        weights="model.safetensors",
        weights_sha256=None,
        size_mb=690,
    ),
    "owlv2": OfficialRepository(
        name="owlv2-base-patch16-ensemble",
        repo="google/owlv2-base-patch16-ensemble",
        revision="cfd3195ba4ea9592eec887ded089f4c08eff231d",
        model_type="owlv2",
        files=(
            "config.json",
            "preprocessor_config.json",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ),
        weights="model.safetensors",
        weights_sha256=None,
        size_mb=620,
    ),
    "sam3": SAM3,  # the one folder serves DETECTOR=sam3 and SAM_MODEL_TYPE=sam3
}
# Its published repository, named in the message that asks for DETECTOR_MODEL.
MM_GROUNDING_DINO_REPOSITORY = "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg"


# What a segmenter's folder needs besides its weights: the processor reads preprocessor_config.json.
SEGMENTER_FILES = ("config.json", "preprocessor_config.json")


def _segmenter(name: str, repo: str, revision: str, model_type: str, size_mb: int) -> OfficialRepository:
    return OfficialRepository(name, repo, revision, model_type, SEGMENTER_FILES, "model.safetensors", None, size_mb)


# Official repositories, those transformers' documentation uses: Meta's SAM 2.1 (transformers' format sits beside
# Meta's .pt since the commits pinned here), the EdgeTAM image model (yonigozlan/EdgeTAM-hf is the edgetam_video
# conversion, another model type), and the SAM-HQ authors' (SysCV) community conversions. The commits
# are those public code pins for these repositories, each found in two or more places; "main" where none was found
# (docs/models.md says which and why).
TRANSFORMERS_MODELS: dict[str, OfficialRepository] = {
    model.name: model
    for model in (
        _segmenter(
            "sam2.1-hiera-tiny", "facebook/sam2.1-hiera-tiny", "de431c4043854a71d8101e17995dfe596bf101a5", "sam2", 156
        ),
        _segmenter(
            "sam2.1-hiera-small", "facebook/sam2.1-hiera-small", "ee5bba1d82bb8749febdf90f45e84b687142ba03", "sam2", 184
        ),
        _segmenter("sam2.1-hiera-base-plus", "facebook/sam2.1-hiera-base-plus", "main", "sam2", 324),
        _segmenter(
            "sam2.1-hiera-large", "facebook/sam2.1-hiera-large", "665f8e2ad61cf5f53d65644ff27c8ee525124610", "sam2", 898
        ),
        _segmenter("edgetam", "yonigozlan/edgetam-1", "main", "edgetam", 55),
        _segmenter("sam-hq-vit-b", "syscv-community/sam-hq-vit-base", "main", "sam_hq", 379),
        _segmenter("sam-hq-vit-l", "syscv-community/sam-hq-vit-large", "main", "sam_hq", 1250),
        _segmenter("sam-hq-vit-h", "syscv-community/sam-hq-vit-huge", "main", "sam_hq", 2570),
        SAM3,
    )
}


# The video predictors' official folders (VIDEO_MODEL): SAM 2.1's and SAM 3's repositories hold the memory modules
# beside the image model's, so they are the segmenters' folders; EdgeTAM's image conversion holds the image model
# alone, and its video conversion is another repository.
VIDEO_REPOSITORIES: dict[str, OfficialRepository] = {
    **{name: model for name, model in TRANSFORMERS_MODELS.items() if name.startswith("sam2.1")},
    "edgetam": _segmenter("edgetam-video", "yonigozlan/EdgeTAM-hf", "main", "edgetam_video", 55),
    "sam3": SAM3,
}


@dataclass(frozen=True)
class CheckpointLocation:
    """Where the backend looks for one model's weights and which setting decides it. `official` is what
    `weights download` puts at `path` when the setting is left unset; None when the setting names the user's own
    file or folder, which no download would replace."""

    what: str  # "SAM", "GroundingDINO", "text encoder", "OWLv2", ...
    setting: str  # the variable that points at a local file instead
    path: Path
    official: OfficialCheckpoint | OfficialRepository | None

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


def _hub_sha256(response: requests.Response) -> str | None:
    """The SHA-256 the Hugging Face hub states for a large file (X-Linked-Etag, on the redirect to its storage)."""
    for answer in (*response.history, response):
        stated = answer.headers.get("X-Linked-Etag", "").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", stated):
            return stated
    return None


def _download(url: str, target: Path, sha256: str | None, setting: str, timeout_s: float, token: str = "") -> None:
    """`url` into `target`, all or nothing; only when the bytes match `sha256`, else the SHA-256 the hub states
    for the file, if any. `token` goes to the hub as a bearer token (requests drops it on a redirect to another
    host, such as the hub's storage)."""
    digest = hashlib.sha256()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with (
            os.fdopen(handle, "wb") as out,
            requests.get(url, stream=True, timeout=timeout_s, headers=headers) as response,
        ):
            response.raise_for_status()
            sha256 = sha256 or _hub_sha256(response)
            for chunk in response.iter_content(chunk_size=1024 * 1024):
                out.write(chunk)
                digest.update(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise WrongCheckpoint(
                f"checksum mismatch for {url}: got {digest.hexdigest()}, expected {sha256}; nothing was kept: run "
                f"`{WEIGHTS_COMMAND}` again, or set {setting} to a copy you have"
            )
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


def download_checkpoint(location: CheckpointLocation, timeout_s: float = 60.0, token: str = "") -> Path:
    """Fetch `location`'s official file or folder into place unless something is already there, which is used as
    it is. `token` (HF_TOKEN) is sent for a gated repository only."""
    official = location.official
    if location.path.exists() or official is None:
        return location.path
    if isinstance(official, OfficialRepository):
        return download_repository(location, official, timeout_s=timeout_s, token=token)
    location.path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%d MB) from %s", official.filename, official.size_mb, official.url)
    try:
        _download(official.url, location.path, official.sha256, location.setting, timeout_s)
    except requests.RequestException as error:
        elsewhere = f"curl -L --create-dirs -o {location.path} {official.url}"
        raise DownloadFailed(_unreachable(location, official.url, error, elsewhere)) from error
    return location.path


def gated_access(repository: OfficialRepository, location: CheckpointLocation, status: int | None) -> str:
    """What to do about a gated repository the hub would not serve: no token (`status` None: nothing was asked),
    a token the hub does not know (401) or an account not approved (403)."""
    page = f"{HUGGING_FACE}/{repository.repo}"
    held = ", ".join((*repository.files, repository.weights))
    instead = f"or set {location.setting} to a copy of the folder you have ({held})"
    if status is None:
        return (
            f"{repository.repo} is gated: its owner approves each Hugging Face account. Ask for access at {page}, "
            f"then set HF_TOKEN to an access token of the approved account and run `{WEIGHTS_COMMAND}` again; {instead}"
        )
    if status == 401:
        return (
            f"the Hugging Face hub refused HF_TOKEN for {repository.repo} (HTTP 401: not a valid token); create a "
            f"read token at {HUGGING_FACE}/settings/tokens for an account approved at {page}; {instead}"
        )
    return (
        f"HF_TOKEN's account may not download {repository.repo} (HTTP 403): access is not requested or not approved "
        f"yet; ask for it at {page} and wait for the approval e-mail; {instead}"
    )


def download_repository(
    location: CheckpointLocation,
    repository: OfficialRepository,
    endpoint: str = HUGGING_FACE,
    timeout_s: float = 60.0,
    token: str = "",
) -> Path:
    """`repository`'s files at its revision into a staging folder beside `location.path`, renamed to it only once
    every file is in, the weights' SHA-256 matches and `check_model_folder` accepts what came. A gated repository
    needs `token` (HF_TOKEN): without one nothing is asked of the hub, and a refusal says what to do."""
    folder = location.path
    if repository.gated and not token:
        raise DownloadFailed(gated_access(repository, location, None))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".part"))
    if not repository.pinned:
        log.warning("%s has no pinned commit here: fetching its branch %r", repository.repo, repository.revision)
    log.info("downloading %s (%d MB) at revision %s", repository.repo, repository.size_mb, repository.revision)
    try:
        for filename in (*repository.files, repository.weights):
            url = repository.url(filename, endpoint)
            checksum = repository.weights_sha256 if filename == repository.weights else None
            try:
                _download(
                    url, staging / filename, checksum, location.setting, timeout_s, token if repository.gated else ""
                )
            except requests.RequestException as error:
                status = (
                    error.response.status_code
                    if isinstance(error, requests.HTTPError) and error.response is not None
                    else None
                )
                if repository.gated and status in (401, 403):
                    raise DownloadFailed(gated_access(repository, location, status)) from error
                elsewhere = (
                    f"hf download {repository.repo} {' '.join((*repository.files, repository.weights))} "
                    f"--revision {repository.revision} --local-dir {folder}"
                )
                raise DownloadFailed(_unreachable(location, url, error, elsewhere)) from error
        try:
            check_model_folder(staging, repository)
        except WrongCheckpoint as error:
            raise WrongCheckpoint(f"{error}; nothing was kept: set {location.setting} to a copy you have") from error
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_model_folder(folder: Path, repository: OfficialRepository) -> None:
    """WrongCheckpoint unless `folder` holds `repository`'s model: its config's model_type and every file."""
    where = f"{repository.repo} at {repository.revision}"
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise WrongCheckpoint(f"{where} has no readable config.json: {error}") from error
    if model_type != repository.model_type:
        raise WrongCheckpoint(f"{where} holds a {model_type!r} model, not a {repository.model_type} one")
    missing = [name for name in (*repository.files, repository.weights) if not (folder / name).is_file()]
    if missing:
        raise WrongCheckpoint(f"{where} lacks {', '.join(missing)}")
