"""The training feature store on a real disk: what it keeps, its bound, torn and foreign files, the clean-up a
training does, and a disk that refuses writes."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from backend.cache.embeddings import serialize_embedding
from backend.models.base import ImageEmbedding
from backend.project_files import ProjectFiles
from backend.training.features import TrainingFeatures


def embedding(seed: int) -> ImageEmbedding:
    rng = np.random.default_rng(seed)
    return ImageEmbedding(
        features=rng.standard_normal((8, 4, 4)).astype(np.float16),
        original_size=(30, 40),
        input_size=(48, 64),
        extras={"high_res": rng.standard_normal((2, 8, 8)).astype(np.float16)},
    )


def same(first: ImageEmbedding, second: ImageEmbedding) -> bool:
    return serialize_embedding(first) == serialize_embedding(second)


ONE = len(serialize_embedding(embedding(0)))


@pytest.fixture
def files(tmp_path) -> ProjectFiles:
    return ProjectFiles(tmp_path, 5)


def test_stored_features_read_back_equal(files):
    store = TrainingFeatures(files, "sam:vit_b", 10 * ONE)
    assert store.get("abc1") is None
    assert store.put("abc1", embedding(1))
    stored = store.get("abc1")
    assert stored is not None and same(stored, embedding(1))
    assert stored.original_size == (30, 40) and set(stored.extras) == {"high_res"}
    assert store.stored_bytes() == ONE


def test_another_encoders_features_are_never_read(files):
    TrainingFeatures(files, "sam:vit_b", 10 * ONE).put("abc1", embedding(1))
    assert TrainingFeatures(files, "sam2.1-hiera-tiny", 10 * ONE).get("abc1") is None


def test_the_store_stops_at_its_bound_and_says_so(files, caplog):
    store = TrainingFeatures(files, "sam:vit_b", 2 * ONE)
    assert store.put("a1", embedding(1)) and store.put("a2", embedding(2))
    with caplog.at_level(logging.WARNING, logger="backend.training.features"):
        assert not store.put("a3", embedding(3))
    assert store.get("a3") is None and store.stored_bytes() == 2 * ONE
    assert "TRAIN_FEATURES_MAX_MB" in caplog.text and "encodes that image again" in caplog.text
    assert not TrainingFeatures(files, "sam:vit_b", 0).put("a4", embedding(4))


def test_a_torn_file_reads_as_absent_and_is_stored_again(files, caplog):
    store = TrainingFeatures(files, "sam:vit_b", 10 * ONE)
    store.put("abc1", embedding(1))
    path = next(store.folder.glob("abc1*"))
    path.write_bytes(path.read_bytes()[: ONE // 2])  # a disk that lost the end of the file
    with caplog.at_level(logging.WARNING, logger="backend.training.features"):
        assert store.get("abc1") is None
    assert "unreadable" in caplog.text and not path.exists()
    assert store.put("abc1", embedding(1))
    stored = store.get("abc1")
    assert stored is not None and same(stored, embedding(1))


def test_a_disk_that_refuses_the_write_leaves_the_image_to_be_encoded_again(files, caplog):
    files.features.parent.mkdir(parents=True)
    files.features.write_bytes(b"")  # a file where the folder goes: every write fails as on a full disk
    store = TrainingFeatures(files, "sam:vit_b", 10 * ONE)
    with caplog.at_level(logging.WARNING, logger="backend.training.features"):
        assert not store.put("abc1", embedding(1))
    assert store.get("abc1") is None and "not stored for training" in caplog.text


def test_keep_only_removes_unannotated_images_written_before_the_training_and_leftover_temporaries(files):
    store = TrainingFeatures(files, "sam:vit_b", 10 * ONE)
    for digest in ("kept1", "gone1", "gone2"):
        store.put(digest, embedding(len(digest)))
    leftover = store.folder / ".kept1.emb.1234abcd.tmp"  # a writer killed between write and rename
    leftover.write_bytes(b"x" * 10)
    an_hour_ago = time.time() - 3600
    for path in store.folder.iterdir():
        os.utime(path, (an_hour_ago, an_hour_ago))
    training_started = time.time()
    store.put("new1", embedding(9))  # an annotation applied while the training reads the set

    assert store.keep_only({"kept1"}, written_before=training_started) == 2

    assert sorted(path.name for path in store.folder.iterdir()) == ["kept1.emb", "new1.emb"]
    assert store.stored_bytes() == 2 * ONE


def test_a_digest_that_is_not_one_is_refused(files):
    with pytest.raises(ValueError, match="not an image digest"):
        TrainingFeatures(files, "sam:vit_b", ONE).get("../../etc/passwd")
