"""The official checkpoints' paths at their real sizes: SAM ViT-B built, saved as Meta's file and loaded by our
loader; ViT-L/H recognised from their official tensor shapes without being built; GroundingDINO files saved from
DistributedDataParallel; and the checked, all-or-nothing download against a real local HTTP server."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam

from backend.models.checkpoints import SAM_CHECKPOINTS, OfficialCheckpoint, download_checkpoint
from backend.models.grounding_dino import load_grounding_dino
from backend.models.sam import OFFICIAL_ENCODERS, infer_encoder_shape, load_sam


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
        prefixed, grounding_dino_files.config, str(grounding_dino_files.text_encoder), device="cpu"
    ).model
    loaded = model.state_dict()
    compared = [key for key in official if not key.startswith("bert.")]
    assert compared and all(torch.equal(loaded[key], official[key]) for key in compared)


@dataclass
class CheckpointServer:
    """A real HTTP server for one checkpoint file; `/broken` promises the whole file and hangs up halfway."""

    url: str
    payload: bytes
    requests: list[str]


@pytest.fixture
def checkpoint_server() -> Iterator[CheckpointServer]:
    payload = np.random.default_rng(0).integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes()
    served: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.path == "/broken":
                self.wfile.write(payload[: len(payload) // 2])
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            """Quiet: what was served is in `served`."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield CheckpointServer(f"http://127.0.0.1:{server.server_port}", payload, served)
    server.shutdown()
    server.server_close()


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_a_checkpoint_with_the_wrong_checksum_is_refused_and_leaves_nothing(checkpoint_server, tmp_path):
    wrong = OfficialCheckpoint("sam_vit_b_01ec64.pth", f"{checkpoint_server.url}/file", "0" * 64, 3)
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_checkpoint(wrong, tmp_path)
    assert checkpoint_server.requests == ["/file"] and leftovers(tmp_path) == []


def test_a_download_broken_off_halfway_leaves_no_partial_file(checkpoint_server, tmp_path):
    sha256 = hashlib.sha256(checkpoint_server.payload).hexdigest()
    broken = OfficialCheckpoint("sam_vit_b_01ec64.pth", f"{checkpoint_server.url}/broken", sha256, 3)
    with pytest.raises(requests.RequestException):
        download_checkpoint(broken, tmp_path)
    assert checkpoint_server.requests == ["/broken"] and leftovers(tmp_path) == []


def test_a_verified_checkpoint_replaces_a_corrupt_one_and_is_not_fetched_again(checkpoint_server, tmp_path):
    sha256 = hashlib.sha256(checkpoint_server.payload).hexdigest()
    good = OfficialCheckpoint("sam_vit_b_01ec64.pth", f"{checkpoint_server.url}/file", sha256, 3)
    (tmp_path / good.filename).write_bytes(b"truncated by an earlier tool")
    assert download_checkpoint(good, tmp_path).read_bytes() == checkpoint_server.payload
    assert download_checkpoint(good, tmp_path) == tmp_path / good.filename
    assert checkpoint_server.requests == ["/file"] and leftovers(tmp_path) == [good.filename]
