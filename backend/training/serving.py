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
from dataclasses import dataclass

from backend.config import Settings
from backend.models.base import Segmenter
from backend.models.sam import SamSegmenter
from backend.training.files import ProjectFiles
from backend.training.versions import CorruptVersion, Version, VersionStore, parse_pins, pin_for, public_name

log = logging.getLogger(__name__)

MAX_VARIANTS = 8


@dataclass
class _Choice:
    folder_stamp: int  # the versions folder's mtime when chosen
    version: Version | None
    segmenter: Segmenter


class ProjectDecoders:
    """Per-project serving segmenters, thread-safe."""

    def __init__(self, settings: Settings, base_name: Callable[[], str] | None = None) -> None:
        """`base_name`: the model_version of the original SAM, when not this process's settings' (the web tier
        of queue mode reports the workers')."""
        self.settings = settings
        self.base_name = base_name or (lambda: settings.base_model_version)
        self.pins = parse_pins(settings.model_version_pin)
        self._variants: OrderedDict[tuple[int, str, str], SamSegmenter] = OrderedDict()
        self._choices: dict[int, _Choice] = {}
        self._broken: set[tuple[int, str, str]] = set()
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
        if project_id is None or not isinstance(base, SamSegmenter):
            return base, base_name
        files = ProjectFiles(self.settings.model_dir, project_id)
        stamp = self._stamp(files)
        with self._mutex:
            choice = self._choices.get(project_id)
            if choice is None or choice.folder_stamp != stamp:
                choice = self._choose(files, stamp, base)
                self._choices[project_id] = choice
        return choice.segmenter, public_name(base_name, project_id, choice.version)

    def _choose(self, files: ProjectFiles, stamp: int, base: SamSegmenter) -> _Choice:
        store = VersionStore(files)
        versions, _ = store.scan()
        for version in VersionStore.candidates(versions, self.pin_for(files.project_id)) or []:
            key = (files.project_id, version.name, version.metrics["weights_sha256"])
            if key in self._broken:
                continue
            variant = self._variants.get(key)
            if variant is None:
                try:
                    variant = base.with_decoder_state(store.load_state(version))
                except (CorruptVersion, ValueError) as error:
                    log.error("project %d: version %s cannot serve, skipped: %s", files.project_id, version.name, error)
                    self._broken.add(key)
                    continue
                self._variants[key] = variant
                while len(self._variants) > MAX_VARIANTS:
                    self._variants.popitem(last=False)
                log.info("project %d: serving fine-tuned decoder %s", files.project_id, version.name)
            self._variants.move_to_end(key)
            return _Choice(stamp, version, variant)
        return _Choice(stamp, None, base)

    def current_name(self, project_id: int | None) -> str:
        """The model_version a project is served with, without loading anything (for /setup's 3 s)."""
        base_name = self.base_name()
        if project_id is None:
            return base_name
        files = ProjectFiles(self.settings.model_dir, project_id)
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
        files = ProjectFiles(self.settings.model_dir, project_id)
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
