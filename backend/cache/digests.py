"""Which content an image URL served when it was last fetched, so that an image can be recognised without a download.

Encoding ahead asks, for each image it is to encode, whether its embedding is cached already; only the content
(the SHA-256 that keys the cache) can say, and the content needs a download. Every fetch therefore leaves
`sam:url:<SHA-256 of the URL>` → the content's digest in the store, for as long as an embedding lives, and encoding
ahead downloads only an image whose URL is unknown or whose embedding is gone. A URL that serves new content keeps
its old answer until then: encoding ahead may pass it over, and its first click encodes it (a click always fetches).
"""

from __future__ import annotations

import hashlib

from backend.cache.store import ByteStore

URL_KEY = "sam:url:{url_hash}"


class ImageDigests:
    def __init__(self, store: ByteStore, ttl_s: int) -> None:
        self.store = store
        self.ttl_s = ttl_s

    @staticmethod
    def key(url: str) -> str:
        return URL_KEY.format(url_hash=hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest())

    def remember(self, url: str, digest: str) -> None:
        self.store.set(self.key(url), digest.encode(), self.ttl_s)

    def digest(self, url: str) -> str | None:
        value = self.store.get(self.key(url))
        return value.decode() if value is not None else None
