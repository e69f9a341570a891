"""One token policy for Label Studio, label-studio-sdk's: its client for our REST calls (project_api.py)
and the Authorization header for requests made outside it (task image downloads).

A legacy key is sent as `Token <key>`; a personal access token (a JWT refresh token, the default since
Label Studio 1.23 turned legacy tokens off) is exchanged at `POST /api/token/refresh/` for a 5-minute
access token sent as `Bearer`, exchanged again once that one has expired, under the SDK's lock. What is ours,
because the SDK lacks it: the header handed to a plain HTTP client (the SDK builds it only for its own
requests), a fresh exchange when Label Studio answers 401 to an access token the SDK still holds valid
(it expired in flight, or Label Studio's clock runs ahead), and the SDK's refusals turned into AuthError.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.errors import AuthError


def label_studio_client(url: str, api_key: str, **options: Any) -> LabelStudio:
    """label-studio-sdk's client for the Label Studio at `url`. The trailing slash matters: the SDK joins
    `api/token/refresh/` to the base URL with urljoin, which drops a last path segment not followed by
    one (a Label Studio served under a sub-path); its other requests join either way."""
    return LabelStudio(base_url=url.rstrip("/") + "/", api_key=api_key, **options)


def sdk_authorization(client: LabelStudio) -> str:
    """The Authorization value label-studio-sdk sends with its next request, exchanging the key first if needed.

    label-studio-sdk 2.1.2 builds it in `BaseClientWrapper.get_headers()`, reachable only through the
    client's private `_client_wrapper`: no public method hands the header out. Pinned by
    tests/test_protocol.py::test_sdk_authorization_is_token_for_legacy_keys_and_bearer_for_personal_access_tokens.
    """
    return client._client_wrapper.get_headers()["Authorization"]


class LabelStudioCredentials:
    """Thread-safe source of the current Authorization header for one Label Studio and API key."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._http = httpx.Client(timeout=timeout_s)
        self._client: LabelStudio | None = None  # made on first use: the SDK refuses an expired key when made
        self._latest = ""  # the value the current client last handed out
        self._mutex = threading.Lock()

    def header(self) -> dict[str, str]:
        """`{"Authorization": ...}`, or {} without a key; AuthError if Label Studio refuses the key."""
        if not self.api_key:
            return {}
        try:
            with self._mutex:
                if self._client is None:
                    self._client = label_studio_client(self.base_url, self.api_key, httpx_client=self._http)
                client = self._client
            value = sdk_authorization(client)
        except ApiError as error:
            detail = error.body.get("detail") if isinstance(error.body, dict) else None
            reason = f": {detail}" if isinstance(detail, str) else ""
            raise AuthError(
                f"Label Studio refused the personal access token (HTTP {error.status_code}{reason}; "
                "check LABEL_STUDIO_API_KEY)"
            ) from error
        except (httpx.HTTPError, ValueError) as error:  # unreachable, or an answer that is not JSON
            raise AuthError(
                f"could not exchange the personal access token at {self.base_url}/api/token/refresh/: "
                f"{type(error).__name__}"
            ) from error
        with self._mutex:
            if self._client is client:
                self._latest = value
        return {"Authorization": value}

    def refused(self, header: dict[str, str]) -> bool:
        """Label Studio answered 401 to `header`: whether asking header() again can help. For an access
        token it can: the next header() exchanges the key anew, once however many requests were refused."""
        value = header.get("Authorization", "")
        if not value.startswith("Bearer "):
            return False
        with self._mutex:
            if value == self._latest:
                self._client = None
        return True
