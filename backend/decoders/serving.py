"""Which decoder serves each project: the version store's choice, built once per (project, version).

A fine-tuned variant shares the loaded SAM's image encoder and identity, so every project reuses the
same cached embeddings; only its prompt encoder and mask decoder (about 16 MB for any SAM size) and
their ONNX export are its own. The choice is re-read only when the project's versions folder changes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from backend.decoders.versions import Version, VersionStore, parse_pins, pin_for, public_name
from backend.errors import CorruptVersion
from backend.models.base import FineTunable, Segmenter
from backend.project_files import ProjectFiles

log = logging.getLogger(__name__)

MAX_VARIANTS = 8  # fine-tuned decoders kept loaded, over all projects
MAX_CHOICES = 1024  # projects whose choice is remembered; a forgotten one is chosen again from its folder

VariantKey = tuple[int, str, str]  # project, version name, weights' SHA-256


@dataclass
class _Choice:
    folder_stamp: int  # the versions folder's mtime when chosen
    version: Version | None
    variant: VariantKey | None  # None: the original SAM serves


class ProjectDecoders:
    """Per-project serving segmenters, thread-safe. A decoder loads (weights, and on CPU an ONNX export: seconds)
    outside the mutex, so clicks and /setup of every project go on meanwhile; one thread loads each variant,
    and the project's other requests keep the version they had until it is ready."""

    def __init__(self, model_dir: str, base_name: Callable[[], str], model_version_pin: str = "") -> None:
        """Versions are read from `model_dir` (MODEL_DIR); `base_name()` is the model_version of the original SAM
        (the web tier of queue mode asks the workers for theirs); `model_version_pin` is MODEL_VERSION_PIN."""
        self.model_dir = model_dir
        self.base_name = base_name
        self.pins = parse_pins(model_version_pin)
        self._variants: OrderedDict[VariantKey, Segmenter] = OrderedDict()
        self._choices: OrderedDict[int, _Choice] = OrderedDict()
        self._loading: dict[VariantKey, Future[Segmenter | None]] = {}
        self._broken: set[VariantKey] = set()
        self._mutex = threading.Lock()

    def pin_for(self, project_id: int) -> str | None:
        return pin_for(self.pins, project_id)

    def _stamp(self, files: ProjectFiles) -> int:
        try:
            return files.versions.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def serving(self, project_id: int | None, base: Segmenter) -> tuple[Segmenter, str]:
        """The segmenter and model_version that serve `project_id` (None: no project, the original SAM)."""
        base_name = self.base_name()
        if project_id is None or not isinstance(base, FineTunable):
            return base, base_name
        files = ProjectFiles(self.model_dir, project_id)
        stamp = self._stamp(files)
        with self._mutex:
            previous = self._served(project_id, base)
        if previous is not None and previous[0].folder_stamp == stamp:
            choice, segmenter = previous
        else:
            choice, segmenter = self._choose(files, stamp, base, previous)
        return segmenter, public_name(base_name, project_id, choice.version)

    def _served(self, project_id: int, base: Segmenter) -> tuple[_Choice, Segmenter] | None:
        """The project's current choice and its loaded segmenter; None if there is none or its decoder was
        dropped from memory. Callers hold the mutex."""
        choice = self._choices.get(project_id)
        if choice is None:
            return None
        segmenter = base if choice.variant is None else self._variants.get(choice.variant)
        if segmenter is None:
            return None
        self._choices.move_to_end(project_id)
        if choice.variant is not None:
            self._variants.move_to_end(choice.variant)
        return choice, segmenter

    def _remember(self, project_id: int, choice: _Choice, previous: tuple[_Choice, Segmenter] | None) -> None:
        """Make `choice` the project's, and let go of the decoder it replaces: a superseded version serves nobody
        once its requests in flight end, and kept loaded it held a worker's memory (its weights, and on CPU its ONNX
        session) until MAX_VARIANTS newer ones pushed it out. Callers hold the mutex."""
        if previous is not None and previous[0].variant not in (None, choice.variant):
            self._variants.pop(previous[0].variant, None)
        self._choices[project_id] = choice
        self._choices.move_to_end(project_id)
        while len(self._choices) > MAX_CHOICES:
            self._choices.popitem(last=False)

    def _choose(
        self, files: ProjectFiles, stamp: int, base: FineTunable, previous: tuple[_Choice, Segmenter] | None
    ) -> tuple[_Choice, Segmenter]:
        store = VersionStore(files)
        versions, _ = store.scan()
        for version in VersionStore.candidates(versions, self.pin_for(files.project_id)) or []:
            key = (files.project_id, version.name, version.metrics["weights_sha256"])
            with self._mutex:
                if key in self._broken:
                    continue
                segmenter = self._variants.get(key)
                loading = self._loading.get(key)  # another thread's load of this version
                if segmenter is None and loading is None:
                    self._loading[key] = Future()
            if segmenter is None:
                if loading is None:
                    segmenter = self._load(store, version, key, base)
                elif previous is not None:
                    return previous  # another thread loads this version; until then the previous one serves
                else:
                    segmenter = loading.result()
                if segmenter is None:  # the version cannot serve: the next candidate
                    continue
            choice = _Choice(stamp, version, key)
            with self._mutex:
                self._remember(files.project_id, choice, previous)
            return choice, segmenter
        choice = _Choice(stamp, None, None)
        with self._mutex:
            self._remember(files.project_id, choice, previous)
        return choice, base

    def _load(self, store: VersionStore, version: Version, key: VariantKey, base: FineTunable) -> Segmenter | None:
        """Build a version's segmenter, outside the mutex; None (and marked broken) if it cannot serve. Threads
        waiting for its future in `_loading` get None too should the build fail unexpectedly, and serve another
        candidate."""
        segmenter: Segmenter | None = None
        try:
            try:
                segmenter = base.with_decoder_weights(store.load_weights(version))
            except (CorruptVersion, ValueError) as error:
                log.error("project %d: version %s cannot serve, skipped: %s", key[0], version.name, error)
                with self._mutex:
                    self._broken.add(key)
            else:
                log.info("project %d: serving fine-tuned decoder %s", key[0], version.name)
        finally:
            with self._mutex:
                loading = self._loading.pop(key)
                if segmenter is not None:
                    self._variants[key] = segmenter
                    while len(self._variants) > MAX_VARIANTS:
                        self._variants.popitem(last=False)
            loading.set_result(segmenter)
        return segmenter

    def current_name(self, project_id: int | None) -> str:
        """The model_version a project is served with, without loading anything (for /setup's 3 s)."""
        base_name = self.base_name()
        if project_id is None:
            return base_name
        files = ProjectFiles(self.model_dir, project_id)
        with self._mutex:
            choice = self._choices.get(project_id)
            if choice is not None and choice.folder_stamp == self._stamp(files):
                return public_name(base_name, project_id, choice.version)
        versions, _ = VersionStore(files).scan()
        candidates = [
            version
            for version in VersionStore.candidates(versions, self.pin_for(project_id)) or []
            if (project_id, version.name, version.metrics["weights_sha256"]) not in self._broken
        ]
        return public_name(base_name, project_id, candidates[0] if candidates else None)

    def describe(self, project_id: int) -> dict:
        """What /versions shows for a project: every version with its metrics, the pin, and which serves."""
        files = ProjectFiles(self.model_dir, project_id)
        versions, broken = VersionStore(files).scan()
        serving = self.current_name(project_id)
        base_name = self.base_name()
        listed = []
        for version in versions:
            name = public_name(base_name, project_id, version)
            listed.append({"name": version.name, "model_version": name, "serving": name == serving, **version.metrics})
        return {
            "project": project_id,
            "serving": serving,
            "pinned": self.pin_for(project_id),
            "base": base_name,
            "versions": listed,
            "unreadable": broken,
        }
