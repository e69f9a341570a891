"""Task image URL → bytes → RGB pixels (and a video URL → a file), fetching only what the settings allow.

Label Studio's own URLs (`/data/upload/...`, `/data/local-files/?d=...`, or absolute URLs on
LABEL_STUDIO_URL's host) are fetched with the API key; other hosts only when listed in
ALLOWED_IMAGE_HOSTS, and without credentials, and only on public addresses unless
ALLOW_PRIVATE_IMAGE_HOSTS (backend/netguard.py checks the address actually connected to). Local
files are read only below LOCAL_FILES_DOCUMENT_ROOT. Redirects are followed by hand so each hop is
checked the same way. URLs in messages are redacted: no user info, no query values but `d`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.config import Settings
from backend.errors import AuthError, BlockedAddress, ImageError
from backend.netguard import AddressPolicy, CutOff, GuardedAdapter
from backend.protocol.auth import LabelStudioCredentials

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3


def redact_url(url: str) -> str:
    """`url` fit for a log line or an error body: without user:password@ and with query values
    masked (presigned URLs carry signatures there), except Label Studio's local-file path `d`."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unparsable URL>"
    masked = urlencode([(key, value if key == "d" else "***") for key, values in query.items() for value in values])
    return urlunsplit((parts.scheme, netloc, parts.path, masked, ""))


class RedactedRequestLines(logging.Filter):
    """urllib3 logs each request's path and query (at DEBUG): masked here, since presigned URLs carry their
    signatures in the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_url(argument) if isinstance(argument, str) and "?" in argument else argument
                for argument in record.args
            )
        return True


logging.getLogger("urllib3.connectionpool").addFilter(RedactedRequestLines())


@dataclass
class FetchedImage:
    """Raw bytes of a task image and their SHA-256, the key of everything cached about it."""

    url: str
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Transfer:
    """What one kind of download may cost, and the settings that say so (named in the refusals)."""

    what: str  # "image", "video"
    max_bytes: int
    limit_name: str
    timeout_s: float
    timeout_name: str = "DOWNLOAD_TIMEOUT"


@dataclass(frozen=True)
class FetchRules:
    """Where image downloads may go and what they may cost; `FetchRules.of(settings)` reads them."""

    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    local_files_document_root: str = ""
    allowed_image_hosts: tuple[str, ...] = ()
    allow_private_image_hosts: bool = False
    download_timeout_s: float = 10.0
    max_download_bytes: int = 50 * 1024 * 1024

    @classmethod
    def of(cls, settings: Settings) -> FetchRules:
        return cls(**{name.name: getattr(settings, name.name) for name in fields(cls)})


class ImageFetcher:
    def __init__(self, rules: FetchRules) -> None:
        self.rules = rules
        self.label_studio = urlsplit(rules.label_studio_url) if rules.label_studio_url else None
        self.credentials = (
            LabelStudioCredentials(rules.label_studio_url, rules.label_studio_api_key, rules.download_timeout_s)
            if rules.label_studio_url
            else None
        )
        trusted: frozenset[tuple[str, int]] = frozenset()
        if self.label_studio is not None and self.label_studio.hostname:
            default_port = 443 if self.label_studio.scheme == "https" else 80
            trusted = frozenset({(self.label_studio.hostname.lower(), self.label_studio.port or default_port)})
        adapter = GuardedAdapter(AddressPolicy(trusted, rules.allow_private_image_hosts))
        self.http = requests.Session()
        # No proxies or ~/.netrc from the environment: the address check must see the real target.
        self.http.trust_env = False
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    def fetch(self, url: str) -> FetchedImage:
        image = Transfer("image", self.rules.max_download_bytes, "MAX_DOWNLOAD_BYTES", self.rules.download_timeout_s)
        located = self._locate(url, image)
        if isinstance(located, Path):
            return FetchedImage(url, self._read_local(located, image))
        body = io.BytesIO()
        self._download(located, body, image)
        return FetchedImage(located, body.getvalue())

    @contextmanager
    def fetch_to_file(self, url: str, transfer: Transfer) -> Iterator[Path]:
        """The file at `url` on disk for the `with` block: a local file where it lies, a download in a temporary
        file (removed after), written as it arrives, so memory stays flat whatever the size."""
        located = self._locate(url, transfer)
        if isinstance(located, Path):
            self._check_local_size(located, transfer)
            yield located
            return
        suffix = Path(urlsplit(located).path).suffix[:8]
        with tempfile.NamedTemporaryFile(prefix=f"{transfer.what}-", suffix=suffix) as file:
            self._download(located, file, transfer)
            file.flush()
            yield Path(file.name)

    def _locate(self, url: str, transfer: Transfer) -> str | Path:
        """The absolute URL to download, or the checked path of a local file."""
        if not isinstance(url, str) or not url:
            raise ImageError(f"the task's {transfer.what} field is empty or not a string", 400)
        if url.startswith("/data/local-files/") and self.rules.local_files_document_root:
            return self._local_path(url)
        if url.startswith("/"):
            if self.label_studio is None:
                raise ImageError(
                    f"{transfer.what} {redact_url(url)!r} is relative to Label Studio, but LABEL_STUDIO_URL is not set",
                    422,
                )
            return self.rules.label_studio_url + url
        return url

    def _local_path(self, url: str) -> Path:
        # Decoded once, as Label Studio decodes `d`; a second decoding would turn %252e into a dot.
        relative = parse_qs(urlsplit(url).query).get("d", [""])[0].lstrip("/")
        if not relative or "\x00" in relative:
            raise ImageError("local file URL needs a ?d= path without NUL bytes", 400)
        root = Path(self.rules.local_files_document_root).resolve()
        try:
            # resolve() follows symlinks, so a link pointing out of the root is judged by its target.
            target = (root / relative).resolve()
            if not target.is_relative_to(root):
                raise ImageError(f"local file {relative!r} is outside LOCAL_FILES_DOCUMENT_ROOT", 403)
            if not target.is_file():
                raise ImageError(f"local file {relative!r} does not exist", 404)
        except OSError as error:
            raise ImageError(f"local file {relative!r} cannot be read: {error.strerror}", 422) from error
        return target

    def _check_local_size(self, target: Path, transfer: Transfer) -> None:
        try:
            size = target.stat().st_size
        except OSError as error:
            raise ImageError(f"local file {target.name!r} cannot be read: {error.strerror}", 422) from error
        if size > transfer.max_bytes:
            raise ImageError(f"local file {target.name!r} is larger than {transfer.limit_name}", 413)

    def _read_local(self, target: Path, transfer: Transfer) -> bytes:
        self._check_local_size(target, transfer)
        try:
            return target.read_bytes()
        except OSError as error:
            raise ImageError(f"local file {target.name!r} cannot be read: {error.strerror}", 422) from error

    def _is_label_studio(self, parts) -> bool:
        return self.label_studio is not None and (parts.scheme, parts.netloc) == (
            self.label_studio.scheme,
            self.label_studio.netloc,
        )

    def _download(self, url: str, sink: IO[bytes], transfer: Transfer) -> None:
        """The body at `url` into `sink`, all of it within the transfer's time (redirects included)."""
        timeout_s = transfer.timeout_s
        too_slow = f"download of {redact_url(url)} took longer than {transfer.timeout_name} ({timeout_s:g} s)"
        with CutOff(timeout_s) as cut_off:
            try:
                self._follow_redirects(url, sink, transfer)
            except ImageError as error:
                if cut_off.expired.is_set():
                    raise ImageError(too_slow, 504) from error
                raise
            # A body that lasts until the connection closes ends early, and without an error, when it is cut.
            if cut_off.expired.is_set():
                raise ImageError(too_slow, 504)

    def _follow_redirects(self, url: str, sink: IO[bytes], transfer: Transfer) -> None:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise ImageError(f"unsupported {transfer.what} URL scheme {parts.scheme!r}", 400)
            to_label_studio = self._is_label_studio(parts)
            if not to_label_studio and (parts.hostname or "").lower() not in self.rules.allowed_image_hosts:
                raise ImageError(
                    f"{transfer.what} host {parts.hostname!r} is neither LABEL_STUDIO_URL nor in ALLOWED_IMAGE_HOSTS",
                    403,
                )
            response = self._get(url, to_label_studio, transfer.timeout_s)
            if response.is_redirect:
                url = urljoin(url, response.headers.get("Location", ""))
                response.close()
                continue
            self._read_body(response, url, sink, transfer)
            return
        raise ImageError(f"too many redirects fetching {redact_url(url)}", 422)

    def _get(self, url: str, with_auth: bool, timeout_s: float) -> requests.Response:
        try:
            credentials = self.credentials if with_auth else None
            headers = credentials.header() if credentials else {}
            response = self.http.get(url, headers=headers, timeout=timeout_s, stream=True, allow_redirects=False)
            if response.status_code == 401 and credentials and credentials.refused(headers):
                response.close()
                response = self.http.get(
                    url,
                    headers=credentials.header(),
                    timeout=timeout_s,
                    stream=True,
                    allow_redirects=False,
                )
        except AuthError as error:
            raise ImageError(str(error), 422) from error
        except BlockedAddress as error:
            raise ImageError(str(error), 403) from error
        except requests.RequestException as error:
            raise ImageError(f"could not download {redact_url(url)}: {type(error).__name__}", 422) from error
        return response

    def _read_body(self, response: requests.Response, url: str, sink: IO[bytes], transfer: Transfer) -> None:
        shown = redact_url(url)
        with response:
            if response.status_code != 200:
                hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
                raise ImageError(f"downloading {shown} answered HTTP {response.status_code}{hint}", 422)
            limit = transfer.max_bytes
            too_large = f"{transfer.what} at {shown} is larger than {transfer.limit_name} ({limit})"
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageError(too_large, 413)
            written = 0
            try:
                for chunk in response.iter_content(chunk_size=256 * 1024):
                    written += len(chunk)
                    if written > limit:
                        raise ImageError(too_large, 413)
                    sink.write(chunk)
            except requests.RequestException as error:
                raise ImageError(f"download of {shown} broke off: {type(error).__name__}", 422) from error


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels, turned upright by EXIF orientation as browsers (and Label Studio) show them."""
    what = f"the image ({len(data)} bytes)"  # said here: Pillow's own messages name the file as a Python object
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                what = f"the {width}x{height} {image.format} image ({len(data)} bytes)"
                if width * height > max_pixels:
                    raise ImageError(f"image of {width}x{height} pixels is above MAX_IMAGE_PIXELS ({max_pixels})", 413)
                upright = ImageOps.exif_transpose(image)
                return np.asarray(upright.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image rejected as a decompression bomb: {error}", 413) from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"the image could not be decoded: its {len(data)} bytes are in no image format this backend reads "
            f"(they begin {data[:16]!r})",
            422,
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{what} could not be decoded: {error}", 422) from error
