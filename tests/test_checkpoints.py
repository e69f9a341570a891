"""The official checkpoints' paths at their real sizes: SAM ViT-B built, saved as Meta's file and loaded by our
loader; ViT-L/H recognised from their official tensor shapes without being built; GroundingDINO files saved from
DistributedDataParallel; and the checked, all-or-nothing download against a real local HTTP server."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam

from backend.cli import main
from backend.config import Settings
from backend.errors import CheckpointMissing, DownloadFailed, WrongCheckpoint
from backend.models import registry
from backend.models.checkpoints import (
    BERT_BASE_UNCASED,
    DETECTOR_REPOSITORIES,
    SAM3,
    SAM_CHECKPOINTS,
    TRANSFORMERS_MODELS,
    WEIGHTS_COMMAND,
    CheckpointLocation,
    OfficialCheckpoint,
    OfficialRepository,
    download_checkpoint,
    download_repository,
    sha256_of,
)
from backend.models.grounding_dino import load_grounding_dino
from backend.models.registry import load_detector, load_segmenter
from backend.models.sam import OFFICIAL_ENCODERS, infer_encoder_shape, load_sam
from backend.models.transformers_detectors import load_transformers_detector
from tests.assets import REPO
from tests.detector_weights import write_sam3
from tests.hf_segmenters import write_models


def official_shapes(model_type: str) -> dict[str, torch.Tensor]:
    """The state dict of segment_anything's own build of `model_type`, as tensors without data (meta device):
    the official checkpoint's keys and shapes at no memory cost."""
    with torch.device("meta"):
        return sam_model_registry[model_type]().state_dict()


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_the_official_encoders_are_recognised_from_their_tensor_shapes(model_type):
    state = official_shapes(model_type)
    published_mb = sum(tensor.numel() for tensor in state.values()) * 4 / 1e6  # float32, as Meta saved them
    assert published_mb == pytest.approx(SAM_CHECKPOINTS[model_type].size_mb, rel=0.01)
    shape = infer_encoder_shape(state)
    assert shape == OFFICIAL_ENCODERS[model_type]
    # What the loader builds from that shape takes every tensor of the file, each at its size.
    with torch.device("meta"):
        built = _build_sam(shape.embed_dim, shape.depth, shape.num_heads, list(shape.global_attn_indexes))
    assert {key: value.shape for key, value in built.state_dict().items()} == {
        key: value.shape for key, value in state.items()
    }


def test_a_real_size_vit_b_saved_as_metas_file_is_loaded_whole(tmp_path, caplog):
    """Built and saved at its real size (375 MB); not run: every tensor arriving intact is what is in question."""
    torch.manual_seed(0)
    original = sam_model_registry["vit_b"]().state_dict()  # the official architecture, random weights
    path = tmp_path / SAM_CHECKPOINTS["vit_b"].filename
    torch.save(original, path)  # Meta's format: a plain state dict
    caplog.set_level(logging.WARNING)
    segmenter = load_sam(path, model_type="vit_b", device="cpu", decoder_runtime="torch")
    assert not [record for record in caplog.records if "SAM_MODEL_TYPE" in record.getMessage()]
    assert segmenter.identity.startswith("sam-768x12-")
    loaded = segmenter.sam.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[key], original[key]) for key in original)


def test_grounding_dino_saved_from_distributed_training_loads_without_its_module_prefix(grounding_dino_files, tmp_path):
    official = torch.load(grounding_dino_files.checkpoint, map_location="cpu", weights_only=True)["model"]
    prefixed = tmp_path / "groundingdino_ddp.pth"
    torch.save({"model": {f"module.{key}": value for key, value in official.items()}}, prefixed)
    model = load_grounding_dino(
        prefixed, grounding_dino_files.config, grounding_dino_files.text_encoder, device="cpu"
    ).model
    loaded = model.state_dict()
    compared = [key for key in official if not key.startswith("bert.")]
    assert compared and all(torch.equal(loaded[key], official[key]) for key in compared)


@dataclass
class CheckpointServer:
    """A real HTTP server answering `files` by path (404 for others); `/broken` promises the payload and hangs up
    halfway, `/hang-up` closes the connection without an answer."""

    url: str
    payload: bytes
    files: dict[str, bytes]
    requests: list[str]
    # path → the SHA-256 stated for it, as the Hugging Face hub states a large file's (X-Linked-Etag) on its
    # redirect to the storage that serves it (here /storage + path)
    stated: dict[str, str]
    # A gated repository, as the hub answers for one: token → the status for it (200 approved, 403 not yet);
    # no token, or one the hub does not know, 401. Empty: no gate. The Authorization headers that came.
    gate: dict[str, int]
    authorizations: list[str]


@pytest.fixture
def checkpoint_server() -> Iterator[CheckpointServer]:
    payload = np.random.default_rng(0).integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes()
    files = {"/file": payload}
    served: list[str] = []
    stated: dict[str, str] = {}
    gate: dict[str, int] = {}
    authorizations: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            authorizations.append(self.headers.get("Authorization", ""))
            if gate and not self.path.startswith("/storage"):
                status = gate.get(self.headers.get("Authorization", "").removeprefix("Bearer "), 401)
                if status != 200:
                    self.send_error(status)
                    return
            if self.path == "/hang-up":
                self.close_connection = True
                return
            if self.path in stated:
                self.send_response(302)
                self.send_header("Location", "/storage" + self.path)
                self.send_header("X-Linked-Etag", f'"{stated[self.path]}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = payload if self.path == "/broken" else files.get(self.path.removeprefix("/storage"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/broken":
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Quiet: what was served is in `served`."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield CheckpointServer(
        f"http://127.0.0.1:{server.server_port}", payload, files, served, stated, gate, authorizations
    )
    server.shutdown()
    server.server_close()


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def official_sam_at(url: str, sha256: str, directory: Path) -> CheckpointLocation:
    official = OfficialCheckpoint("sam_vit_b_01ec64.pth", url, sha256, 3)
    return CheckpointLocation("SAM", "SAM_CHECKPOINT", directory / official.filename, official)


def test_a_checkpoint_with_the_wrong_checksum_is_refused_and_leaves_nothing(checkpoint_server, tmp_path):
    with pytest.raises(WrongCheckpoint, match="checksum mismatch.*SAM_CHECKPOINT"):
        download_checkpoint(official_sam_at(f"{checkpoint_server.url}/file", "0" * 64, tmp_path))
    assert checkpoint_server.requests == ["/file"] and leftovers(tmp_path) == []


def test_a_download_broken_off_halfway_leaves_no_partial_file(checkpoint_server, tmp_path):
    sha256 = hashlib.sha256(checkpoint_server.payload).hexdigest()
    with pytest.raises(DownloadFailed):
        download_checkpoint(official_sam_at(f"{checkpoint_server.url}/broken", sha256, tmp_path))
    assert checkpoint_server.requests == ["/broken"] and leftovers(tmp_path) == []


def test_a_verified_download_is_kept_and_not_fetched_again(checkpoint_server, tmp_path):
    sha256 = hashlib.sha256(checkpoint_server.payload).hexdigest()
    location = official_sam_at(f"{checkpoint_server.url}/file", sha256, tmp_path)
    assert download_checkpoint(location).read_bytes() == checkpoint_server.payload
    assert download_checkpoint(location) == location.path
    assert checkpoint_server.requests == ["/file"] and leftovers(tmp_path) == [location.path.name]


# --- `weights download` (what `make run` runs): the user's files first, one line when a server is unreachable --


def run_weights_download(monkeypatch, environ: dict[str, str], *args: str) -> int:
    for variable in (
        "SAM_CHECKPOINT",
        "SAM_MODEL_TYPE",
        "GROUNDING_DINO_CHECKPOINT",
        "GROUNDING_DINO_TEXT_ENCODER",
        "HF_TOKEN",
    ):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    return main(["weights", "download", *args])


@pytest.fixture
def sam_served_by(monkeypatch, checkpoint_server):
    """Points the official ViT-B address at the local server's `path`, or at an address nothing listens on
    (`None`): there is no internet here."""

    def serve(path: str | None) -> str:
        url = f"{checkpoint_server.url}{path}" if path else refused_url()
        sha256 = hashlib.sha256(checkpoint_server.payload).hexdigest()
        monkeypatch.setitem(SAM_CHECKPOINTS, "vit_b", OfficialCheckpoint("sam_vit_b_01ec64.pth", url, sha256, 3))
        return url

    return serve


def refused_url() -> str:
    """An address nothing listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/sam_vit_b_01ec64.pth"


def test_weights_download_uses_the_files_the_settings_name_and_contacts_no_server(
    monkeypatch, sam_served_by, checkpoint_server, sam_checkpoint, grounding_dino_files, tmp_path
):
    sam_served_by("/file")
    environ = {
        "WEIGHTS_DIR": str(tmp_path / "weights"),
        "SAM_CHECKPOINT": str(sam_checkpoint),
        "GROUNDING_DINO_CHECKPOINT": str(grounding_dino_files.checkpoint),
        "GROUNDING_DINO_TEXT_ENCODER": str(grounding_dino_files.text_encoder),
    }
    assert run_weights_download(monkeypatch, environ) == 0
    assert checkpoint_server.requests == [] and leftovers(tmp_path / "weights") == []


def test_a_users_own_file_in_weights_dir_is_used_never_downloaded_again(
    monkeypatch, sam_served_by, checkpoint_server, tmp_path
):
    sam_served_by("/file")
    weights = tmp_path / "weights"
    weights.mkdir()
    own = weights / "sam_vit_b_01ec64.pth"
    own.write_bytes(b"a fine-tuned ViT-B of the user's, not Meta's bytes")
    assert run_weights_download(monkeypatch, {"WEIGHTS_DIR": str(weights)}, "--no-grounding-dino") == 0
    assert checkpoint_server.requests == [] and own.read_bytes().startswith(b"a fine-tuned ViT-B")


@pytest.mark.parametrize("path", [None, "/hang-up", "/missing"], ids=["refused", "hung-up", "404"])
def test_an_unreachable_server_is_one_line_naming_the_address_the_setting_and_a_command(
    monkeypatch, sam_served_by, capsys, tmp_path, path
):
    url = sam_served_by(path)
    weights = tmp_path / "weights"
    assert run_weights_download(monkeypatch, {"WEIGHTS_DIR": str(weights)}, "--no-grounding-dino") == 1
    error = capsys.readouterr().err
    target = weights / "sam_vit_b_01ec64.pth"
    assert error.count("\n") == 1 and "Traceback" not in error
    assert url in error and "SAM_CHECKPOINT" in error and f"curl -L --create-dirs -o {target} {url}" in error
    assert leftovers(weights) == []


# --- The text encoder: fetched at a pinned revision and checked; never looked up on a hub at start-up ---------


def serve_repository(server: CheckpointServer, repository: OfficialRepository, folder: Path) -> None:
    """`folder`'s files where `repository`'s revision has them on the hub, the weights behind a redirect stating
    their SHA-256 as the hub does."""
    for filename in (*repository.files, repository.weights):
        server.files["/" + repository.url(filename, "").lstrip("/")] = (folder / filename).read_bytes()
    weights_path = "/" + repository.url(repository.weights, "").lstrip("/")
    server.stated[weights_path] = sha256_of(folder / repository.weights)


@pytest.fixture
def text_encoder_served(checkpoint_server, grounding_dino_files) -> OfficialRepository:
    """The tiny test BERT's files, served where the official repository's pinned revision has them."""
    serve_repository(checkpoint_server, BERT_BASE_UNCASED, grounding_dino_files.text_encoder)
    return BERT_BASE_UNCASED


def text_encoder_location(weights: Path) -> CheckpointLocation:
    return CheckpointLocation("text encoder", "GROUNDING_DINO_TEXT_ENCODER", weights / "bert-base-uncased", None)


def test_the_text_encoder_is_fetched_from_its_pinned_revision_and_refused_when_the_weights_differ(
    checkpoint_server, text_encoder_served, tmp_path
):
    """The checksum stored here wins over what the server states (which is the tiny BERT's own): the tiny BERT's
    weights do not match the official checksum."""
    encoder = text_encoder_served
    with pytest.raises(WrongCheckpoint, match="checksum mismatch") as error:
        download_repository(text_encoder_location(tmp_path), encoder, checkpoint_server.url)
    revision = "/google-bert/bert-base-uncased/resolve/86b5e0934494bd15c9632b12f734a8a67f723594/"
    assert checkpoint_server.requests[-1] == "/storage" + revision + "model.safetensors"
    assert all(path.startswith((revision, "/storage" + revision)) for path in checkpoint_server.requests)
    assert "GROUNDING_DINO_TEXT_ENCODER" in str(error.value)
    assert leftovers(tmp_path) == []


def test_a_hub_download_that_fails_suggests_an_hf_download_command_that_the_hf_cli_takes(tmp_path):
    """`huggingface-cli` is deprecated for `hf`. The suggested command goes to the real `hf` offline: it must get past
    its arguments and stop only at the files it may not fetch."""
    hub = refused_url().rsplit("/", 1)[0]
    with pytest.raises(DownloadFailed) as failed:
        download_repository(text_encoder_location(tmp_path / "weights"), BERT_BASE_UNCASED, hub)
    command = str(failed.value).split("on a machine with access: ", 1)[1]
    assert command.startswith("hf download google-bert/bert-base-uncased "), command
    offline = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    hf = Path(sys.executable).parent / "hf"
    result = subprocess.run([hf, *shlex.split(command)[1:]], env=offline, capture_output=True, text=True, timeout=120)
    # huggingface_hub 2 says "Local entry not found" (1.x printed the exception's name, LocalEntryNotFoundError),
    # naming the repository at the revision it was told.
    revision = "google-bert/bert-base-uncased/tree/86b5e0934494bd15c9632b12f734a8a67f723594"
    assert result.returncode == 1 and "Local entry not found" in result.stderr, result.stderr[-2000:]
    assert revision in result.stderr


def test_an_unpinned_detector_suggests_an_hf_download_command(settings):
    with pytest.raises(CheckpointMissing, match="`hf download ") as missing:
        registry.detector_model(replace(settings, detector="mm-grounding-dino", detector_model=""))
    assert "huggingface-cli" not in str(missing.value)


def test_a_fetched_text_encoder_is_a_folder_grounding_dino_loads(
    checkpoint_server, text_encoder_served, grounding_dino_files, tmp_path
):
    weights_sha256 = hashlib.sha256((grounding_dino_files.text_encoder / "model.safetensors").read_bytes()).hexdigest()
    encoder = replace(text_encoder_served, weights_sha256=weights_sha256)
    folder = download_repository(text_encoder_location(tmp_path), encoder, checkpoint_server.url)
    assert leftovers(tmp_path) == ["bert-base-uncased"]
    assert sorted(leftovers(folder)) == sorted((*encoder.files, encoder.weights))
    detector = load_grounding_dino(grounding_dino_files.checkpoint, grounding_dino_files.config, folder, "cpu", 128)
    assert detector.text_tokens("car . wheel .", [(0, 3), (6, 11)]) == 6


def test_the_default_text_encoder_missing_fails_at_once_naming_the_setting_without_contacting_a_hub(
    checkpoint_server, grounding_dino_files, tmp_path
):
    """In a fresh process, with the Hugging Face hub address pointed at the local server: nothing may ask it."""
    script = (
        "from backend.config import Settings\n"
        "from backend.models.registry import load_detector\n"
        "try:\n"
        "    load_detector(Settings.from_env())\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    environ = {
        "PATH": os.environ["PATH"],
        "HF_ENDPOINT": checkpoint_server.url,
        "HF_HOME": str(tmp_path / "hf"),
        "WEIGHTS_DIR": str(tmp_path / "weights"),
        "GROUNDING_DINO_CONFIG": str(grounding_dino_files.config),
        "GROUNDING_DINO_CHECKPOINT": str(grounding_dino_files.checkpoint),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=environ, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.startswith("CheckpointMissing"), done.stdout + done.stderr
    expected = tmp_path / "weights" / "bert-base-uncased"
    assert "GROUNDING_DINO_TEXT_ENCODER" in done.stdout and str(expected) in done.stdout
    assert WEIGHTS_COMMAND in done.stdout
    assert checkpoint_server.requests == []


# --- What a SAM setting points at: named when absent, recognised when it is the wrong file -------------------


def test_an_explicit_sam_checkpoint_that_is_absent_is_named_without_suggesting_a_download(settings, tmp_path):
    mine = tmp_path / "mine.pth"
    with pytest.raises(CheckpointMissing) as error:
        load_segmenter(replace(settings, sam_checkpoint=str(mine)))
    assert f"SAM_CHECKPOINT={mine}" in str(error.value) and WEIGHTS_COMMAND not in str(error.value)


def test_the_default_sam_checkpoint_absent_names_the_setting_the_file_and_the_download(settings):
    with pytest.raises(CheckpointMissing) as error:
        load_segmenter(replace(settings, sam_checkpoint="", sam_model_type="vit_l"))
    expected = Path(settings.weights_dir) / "sam_vit_l_0b3195.pth"
    message = str(error.value)
    assert str(expected) in message and "SAM_CHECKPOINT" in message and WEIGHTS_COMMAND in message


def test_an_explicit_text_encoder_folder_that_is_absent_is_named_without_suggesting_a_download(
    grounded_settings, tmp_path
):
    with pytest.raises(CheckpointMissing) as error:
        load_detector(replace(grounded_settings, grounding_dino_text_encoder=str(tmp_path / "bert")))
    message = str(error.value)
    assert f"GROUNDING_DINO_TEXT_ENCODER={tmp_path / 'bert'}" in message and WEIGHTS_COMMAND not in message


def official_encoder_keys(model_type: str) -> dict[str, torch.Tensor]:
    """Only the tensors that tell an encoder's type (patch embedding and relative positions), at their official
    shapes: a few MB instead of the whole file."""
    return {
        key: torch.zeros(value.shape)
        for key, value in official_shapes(model_type).items()
        if key == "image_encoder.patch_embed.proj.weight" or key.endswith("attn.rel_pos_h")
    }


def test_a_sam_file_of_another_official_type_than_sam_model_type_is_refused_naming_both(settings, tmp_path):
    path = tmp_path / "my_sam.pth"
    torch.save(official_encoder_keys("vit_b"), path)
    with pytest.raises(WrongCheckpoint) as error:
        load_segmenter(replace(settings, sam_checkpoint=str(path), sam_model_type="vit_h"))
    message = str(error.value)
    assert "SAM_MODEL_TYPE=vit_h" in message and "holds SAM vit_b" in message and "SAM_MODEL_TYPE=vit_b" in message


def write_wrong_file(kind: str, folder: Path, sam_checkpoint: Path) -> Path:
    tensor = torch.zeros(2, 2)
    if kind == "a Hugging Face model folder":
        path = folder / "sam-vit-base"
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "sam"}')
        return path
    path = folder / f"{kind.replace(' ', '_')}.pth"
    if kind == "truncated":
        whole = sam_checkpoint.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "a GroundingDINO checkpoint":
        keys = ["backbone.0.patch_embed.proj.weight", "transformer.encoder.layers.0.linear1.weight", "bert.pooler.w"]
        torch.save({"model": {key: tensor for key in keys}}, path)
    elif kind == "a SAM 2 checkpoint":
        keys = ["image_encoder.trunk.patch_embed.proj.weight", "memory_encoder.out_proj.weight", "sam_mask_decoder.w"]
        torch.save({"model": {key: tensor for key in keys}}, path)
    return path


@pytest.mark.parametrize(
    "kind", ["a GroundingDINO checkpoint", "a SAM 2 checkpoint", "a Hugging Face model folder", "truncated"]
)
def test_a_wrong_file_in_sam_checkpoint_is_named_for_what_it_is(settings, sam_checkpoint, tmp_path, kind):
    path = write_wrong_file(kind, tmp_path, sam_checkpoint)
    with pytest.raises(WrongCheckpoint) as error:
        load_segmenter(replace(settings, sam_checkpoint=str(path)))
    assert f"SAM_CHECKPOINT={path}" in str(error.value) and kind in str(error.value)


# --- The transformers detectors: their official repositories at pinned revisions, checked as the hub states ----


@pytest.fixture
def owlv2_served(checkpoint_server, detector_folders) -> OfficialRepository:
    """The small OWLv2's files where the official repository's pinned revision has them."""
    repository = DETECTOR_REPOSITORIES["owlv2"]
    serve_repository(checkpoint_server, repository, detector_folders["owlv2"])
    return repository


def detector_location(weights: Path, repository: OfficialRepository) -> CheckpointLocation:
    return CheckpointLocation("OWLv2", "DETECTOR_MODEL", weights / repository.name, repository)


def test_a_detector_repository_is_fetched_at_its_pinned_revision_and_loads(checkpoint_server, owlv2_served, tmp_path):
    folder = download_repository(detector_location(tmp_path, owlv2_served), owlv2_served, checkpoint_server.url)
    revision = "/google/owlv2-base-patch16-ensemble/resolve/cfd3195ba4ea9592eec887ded089f4c08eff231d/"
    assert all(path.startswith((revision, "/storage" + revision)) for path in checkpoint_server.requests)
    assert sorted(leftovers(folder)) == sorted((*owlv2_served.files, owlv2_served.weights))
    detector = load_transformers_detector("owlv2", folder, "cpu")
    assert detector.text_tokens("car . wheel .", [(0, 3), (6, 11)]) == 7


def test_detector_weights_that_differ_from_what_the_hub_states_are_refused(checkpoint_server, owlv2_served, tmp_path):
    weights_path = "/" + owlv2_served.url(owlv2_served.weights, "").lstrip("/")
    checkpoint_server.stated[weights_path] = "0" * 64
    with pytest.raises(WrongCheckpoint, match="checksum mismatch.*DETECTOR_MODEL"):
        download_repository(detector_location(tmp_path, owlv2_served), owlv2_served, checkpoint_server.url)
    assert leftovers(tmp_path) == []


# --- The transformers segmenters: the same mechanism as the detectors, checked for the model they were fetched as --


@pytest.fixture(scope="module")
def sam21_tiny_folder(tmp_path_factory) -> Path:
    """SAM 2.1 Hiera-tiny at reduced size with random weights, saved by transformers' `save_pretrained`."""
    return write_models(tmp_path_factory.mktemp("segmenters"), reduced=True, names=("sam2.1-hiera-tiny",))[
        "sam2.1-hiera-tiny"
    ]


def test_a_segmenter_repository_is_fetched_at_its_pinned_revision_into_the_default_folder_and_loads(
    checkpoint_server, sam21_tiny_folder, tmp_path
):
    repository = TRANSFORMERS_MODELS["sam2.1-hiera-tiny"]
    serve_repository(checkpoint_server, repository, sam21_tiny_folder)
    fetched = replace(Settings(), sam_model_type="sam2.1-hiera-tiny", weights_dir=str(tmp_path), device="cpu")
    folder = download_repository(registry.sam_checkpoint(fetched), repository, checkpoint_server.url)
    revision = "/facebook/sam2.1-hiera-tiny/resolve/de431c4043854a71d8101e17995dfe596bf101a5/"
    assert all(path.startswith((revision, "/storage" + revision)) for path in checkpoint_server.requests)
    assert "/storage" + revision + "model.safetensors" in checkpoint_server.requests  # the hub's stated SHA-256
    assert leftovers(tmp_path) == ["sam2.1-hiera-tiny"]
    assert sorted(leftovers(folder)) == sorted((*repository.files, repository.weights))
    assert load_segmenter(fetched).identity.startswith("sam2.1-hiera-tiny")


def test_segmenter_weights_that_differ_from_what_the_hub_states_are_refused_naming_the_setting(
    checkpoint_server, sam21_tiny_folder, tmp_path
):
    repository = TRANSFORMERS_MODELS["sam2.1-hiera-tiny"]
    serve_repository(checkpoint_server, repository, sam21_tiny_folder)
    checkpoint_server.stated["/" + repository.url(repository.weights, "").lstrip("/")] = "0" * 64
    location = CheckpointLocation("sam2.1-hiera-tiny", "SAM_CHECKPOINT", tmp_path / repository.name, repository)
    with pytest.raises(WrongCheckpoint, match="checksum mismatch") as error:
        download_repository(location, repository, checkpoint_server.url)
    assert "SAM_CHECKPOINT" in str(error.value) and leftovers(tmp_path) == []


def test_a_repository_holding_another_model_is_refused_naming_both_and_leaves_nothing(
    checkpoint_server, sam21_tiny_folder, tmp_path
):
    """SAM 2.1 files where SAM-HQ ViT-B is expected: every file arrives and checks out, but it is not SAM-HQ."""
    repository = TRANSFORMERS_MODELS["sam-hq-vit-b"]
    serve_repository(checkpoint_server, repository, sam21_tiny_folder)
    location = CheckpointLocation("sam-hq-vit-b", "SAM_CHECKPOINT", tmp_path / repository.name, repository)
    with pytest.raises(WrongCheckpoint, match="holds a 'sam2' model, not a sam_hq one") as error:
        download_repository(location, repository, checkpoint_server.url)
    assert "SAM_CHECKPOINT" in str(error.value) and leftovers(tmp_path) == []


# --- SAM 3: a gated repository, fetched with HF_TOKEN; a folder of one's own used as it is --------------------------


def test_sam3_without_a_token_says_it_is_gated_and_how_to_get_access_asking_no_server(monkeypatch, capsys, tmp_path):
    weights = tmp_path / "weights"
    assert run_weights_download(monkeypatch, {"WEIGHTS_DIR": str(weights)}, "--sam", "sam3", "--no-grounding-dino") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "facebook/sam3 is gated" in error and "https://huggingface.co/facebook/sam3" in error
    assert "set HF_TOKEN" in error and "SAM_CHECKPOINT" in error
    assert leftovers(weights) == []  # not even a staging folder: nothing was asked of the hub


@pytest.fixture(scope="module")
def sam3_official_folder(tmp_path_factory) -> Path:
    """The reduced SAM 3 as facebook/sam3 holds it: the whole model (a sam3_video config, detector and tracker in one
    checkpoint), its processor and its tokenizer."""
    return write_sam3(tmp_path_factory.mktemp("sam3") / "official")


APPROVED, PENDING = "hf_approvedAccount0123", "hf_pendingAccount01234"


@pytest.mark.parametrize(
    ("token", "said"),
    [(PENDING, "HTTP 403): access is not requested or not approved yet"), ("hf_unknown0123456789", "HTTP 401")],
    ids=["not-approved", "unknown-token"],
)
def test_sam3_refused_by_the_hub_says_why_and_leaves_nothing(
    checkpoint_server, sam3_official_folder, tmp_path, token, said
):
    serve_repository(checkpoint_server, SAM3, sam3_official_folder)
    checkpoint_server.gate.update({APPROVED: 200, PENDING: 403})
    location = registry.sam_checkpoint(replace(Settings(), sam_model_type="sam3", weights_dir=str(tmp_path)))
    with pytest.raises(DownloadFailed) as refused:
        download_repository(location, SAM3, checkpoint_server.url, token=token)
    assert said in str(refused.value) and "HF_TOKEN" in str(refused.value)
    assert "https://huggingface.co/facebook/sam3" in str(refused.value) and "SAM_CHECKPOINT" in str(refused.value)
    assert token not in str(refused.value)
    assert leftovers(tmp_path) == []


def test_sam3_is_fetched_with_the_token_at_its_pinned_revision_and_loads(
    checkpoint_server, sam3_official_folder, tmp_path
):
    serve_repository(checkpoint_server, SAM3, sam3_official_folder)
    checkpoint_server.gate.update({APPROVED: 200, PENDING: 403})
    settings = replace(Settings(), sam_model_type="sam3", weights_dir=str(tmp_path), device="cpu")
    folder = download_repository(registry.sam_checkpoint(settings), SAM3, checkpoint_server.url, token=APPROVED)
    revision = "/facebook/sam3/resolve/3c879f39826c281e95690f02c7821c4de09afae7/"
    assert all(path.startswith((revision, "/storage" + revision)) for path in checkpoint_server.requests)
    # The token goes to the hub, not to the storage its redirect names (requests drops it for another host; here
    # the same host, so the check is that every hub request carried it).
    hub_requests = [i for i, path in enumerate(checkpoint_server.requests) if path.startswith(revision)]
    assert all(checkpoint_server.authorizations[i] == f"Bearer {APPROVED}" for i in hub_requests)
    assert folder == tmp_path / "sam3" and sorted(leftovers(folder)) == sorted((*SAM3.files, SAM3.weights))
    assert load_segmenter(settings).identity.startswith("sam3-")
    assert load_detector(replace(settings, detector="sam3")).name == "SAM 3"  # one folder serves both


def test_a_sam3_folder_of_ones_own_is_used_without_a_token_or_a_server(
    monkeypatch, checkpoint_server, sam3_official_folder, tmp_path
):
    environ = {
        "WEIGHTS_DIR": str(tmp_path / "weights"),
        "SAM_MODEL_TYPE": "sam3",
        "SAM_CHECKPOINT": str(sam3_official_folder),
    }
    assert run_weights_download(monkeypatch, environ, "--no-grounding-dino") == 0
    assert checkpoint_server.requests == []
    settings = replace(Settings(), sam_model_type="sam3", sam_checkpoint=str(sam3_official_folder), device="cpu")
    assert load_segmenter(settings).identity.startswith("sam3-")


def test_tokens_go_only_to_gated_repositories(checkpoint_server, sam21_tiny_folder, tmp_path):
    repository = TRANSFORMERS_MODELS["sam2.1-hiera-tiny"]
    serve_repository(checkpoint_server, repository, sam21_tiny_folder)
    location = CheckpointLocation("sam2.1-hiera-tiny", "SAM_CHECKPOINT", tmp_path / repository.name, repository)
    download_repository(location, repository, checkpoint_server.url, token=APPROVED)
    assert checkpoint_server.authorizations and not any(checkpoint_server.authorizations)


def test_weights_download_for_a_video_model_looks_for_its_official_folder(
    monkeypatch, sam_served_by, checkpoint_server, tmp_path, caplog
):
    """`--video edgetam` wants EdgeTAM's video conversion (a folder of its own, not the image model's), found here
    already in WEIGHTS_DIR, so nothing is fetched."""
    sam_served_by("/file")
    weights = tmp_path / "weights"
    (weights / "edgetam-video").mkdir(parents=True)
    (weights / "sam_vit_b_01ec64.pth").write_bytes(b"the user's ViT-B")
    caplog.set_level("INFO")
    arguments = ("--no-grounding-dino", "--video", "edgetam")
    assert run_weights_download(monkeypatch, {"WEIGHTS_DIR": str(weights)}, *arguments) == 0
    assert checkpoint_server.requests == []
    assert f"edgetam video predictor weights: using {weights / 'edgetam-video'}" in caplog.text
