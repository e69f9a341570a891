"""A project's fine-tuned decoder versions: written atomically, listed with their metrics, chosen for serving.

MODEL_DIR/<project>/versions/v<N>/ holds decoder.pt (the prompt encoder and mask decoder weights under
the official checkpoint's key names) and metrics.json. A version is assembled in a hidden folder and
renamed into place only once complete and flushed to disk, so a training killed mid-way leaves no
version behind, only a hidden folder that listing ignores and the next training removes. metrics.json
records the weights' SHA-256: a damaged file is found on loading, logged, and the next candidate serves.

Which version serves: the pinned one if MODEL_VERSION_PIN names one for the project ("base" pins the
original SAM), else the newest version that scored no worse than its predecessor on held-out data,
else the original SAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from backend.errors import CorruptVersion
from backend.project_files import ProjectFiles, fsync_directory

log = logging.getLogger(__name__)

WEIGHTS_FILE = "decoder.pt"
METRICS_FILE = "metrics.json"
BASE = "base"
PARTIAL_PREFIX = ".partial-"
_VERSION_NAME = re.compile(r"^v(\d+)$")


@dataclass
class Version:
    name: str  # "v3"
    path: Path
    metrics: dict

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def accepted(self) -> bool:
        return bool(self.metrics.get("accepted"))


def parse_pins(raw: str) -> dict[int | None, str]:
    """MODEL_VERSION_PIN: "1=v3,2=base" pins per project; a bare "v3" or "base" pins every project."""
    pins: dict[int | None, str] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        project, _, version = entry.rpartition("=")
        version = version.strip()
        if version != BASE and not _VERSION_NAME.match(version):
            raise ValueError(f"MODEL_VERSION_PIN entry {entry!r}: the version must be 'base' or like 'v3'")
        if project and not project.strip().isdigit():
            raise ValueError(f"MODEL_VERSION_PIN entry {entry!r}: the project must be a Label Studio project id")
        pins[int(project) if project else None] = version
    return pins


def pin_for(pins: dict[int | None, str], project_id: int) -> str | None:
    return pins.get(project_id, pins.get(None))


def public_name(base_version: str, project_id: int, version: Version | None) -> str:
    """The model_version predictions carry: the base SAM's name, extended by the project's version."""
    return base_version if version is None else f"{base_version}-p{project_id}-{version.name}"


def _read_metrics(path: Path) -> dict:
    metrics = json.loads((path / METRICS_FILE).read_text())
    if not isinstance(metrics, dict) or not isinstance(metrics.get("weights_sha256"), str):
        raise ValueError("metrics.json lacks weights_sha256")
    return metrics


class VersionStore:
    """The versions of one project."""

    def __init__(self, files: ProjectFiles) -> None:
        self.files = files
        self.root = files.versions

    def scan(self) -> tuple[list[Version], list[dict]]:
        """Readable versions, oldest first, and {"name", "error"} for each folder that is not one."""
        versions: list[Version] = []
        broken: list[dict] = []
        if not self.root.is_dir():
            return versions, broken
        for entry in self.root.iterdir():
            if not entry.is_dir() or not _VERSION_NAME.match(entry.name):
                continue
            try:
                versions.append(Version(entry.name, entry, _read_metrics(entry)))
            except (OSError, ValueError) as error:
                log.error("project %d: version %s is unreadable, skipped: %s", self.files.project_id, entry.name, error)
                broken.append({"name": entry.name, "error": f"unreadable metrics.json: {error}"})
        versions.sort(key=lambda version: version.number)
        return versions, broken

    def _next_name(self) -> str:
        numbers = [int(m.group(1)) for e in self.root.iterdir() if (m := _VERSION_NAME.match(e.name))]
        return f"v{max(numbers, default=0) + 1}"

    def write(self, weights: bytes, metrics: dict) -> Version:
        """Write a complete version (the decoder weights, as the segmenter serialised them) or nothing. Callers hold
        the project's training lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = self._next_name()
        partial = self.root / f"{PARTIAL_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            complete = {**metrics, "version": name, "weights_sha256": hashlib.sha256(weights).hexdigest()}
            for file_name, data in ((WEIGHTS_FILE, weights), (METRICS_FILE, json.dumps(complete, indent=2).encode())):
                with open(partial / file_name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_directory(partial)
            os.rename(partial, self.root / name)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        fsync_directory(self.root)
        return Version(name, self.root / name, complete)

    def remove_partial(self) -> None:
        """Remove what an interrupted write left. Callers hold the project's training lock."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(PARTIAL_PREFIX):
                log.warning("project %d: removing %s left by an interrupted training", self.files.project_id, entry)
                shutil.rmtree(entry, ignore_errors=True)

    def load_weights(self, version: Version) -> bytes:
        """The version's decoder weights, checked against the checksum its metrics recorded."""
        try:
            weights = (version.path / WEIGHTS_FILE).read_bytes()
        except OSError as error:
            raise CorruptVersion(f"{version.name}: cannot read {WEIGHTS_FILE}: {error}") from error
        if hashlib.sha256(weights).hexdigest() != version.metrics["weights_sha256"]:
            raise CorruptVersion(f"{version.name}: {WEIGHTS_FILE} does not match the checksum in {METRICS_FILE}")
        return weights

    @staticmethod
    def candidates(versions: list[Version], pin: str | None) -> list[Version] | None:
        """Versions to try for serving, best first; None when the original SAM is pinned."""
        if pin == BASE:
            return None
        by_name = {version.name: version for version in versions}
        ordered = [version for version in reversed(versions) if version.accepted]
        if pin is not None:
            if pin in by_name:
                # Should the pinned version be damaged, the usual choice serves rather than nothing.
                return [by_name[pin], *(version for version in ordered if version.name != pin)]
            log.error("MODEL_VERSION_PIN names %s, which is not a version of this project; serving the newest", pin)
        return ordered
