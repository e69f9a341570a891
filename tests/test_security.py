"""Who gets in, what the backend fetches, and how much work one request may cause.

Everything runs against the real app, the real Label Studio stand-in over HTTP and real files; the
only stand-in below the HTTP layer is a DNS answer in the rebinding test (no DNS server can run here).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import threading
import time
import zlib
from dataclasses import replace

import pytest

from backend.bookkeeping.imports import ImportedTask, ImportedTasks
from backend.cache.store import MemoryStore
from backend.config import Settings
from backend.errors import ImageError, SettingsError
from backend.http.server import create_app
from backend.images import FetchRules, ImageFetcher, decode_image, redact_url
from backend.inference.local import Predictor
from backend.models.loader import BackgroundLoader
from backend.project_files import ProjectFiles
from tests.assets import recorded
from tests.conftest import make_client
from tests.label_studio_standin import make_personal_access_token
from tests.test_grounding_dino import grounded_client
from tests.test_protocol import assert_brush_results, interactive

KEYPOINTS = "04-predict-interactive-keypoints.json"
ROUTES = [
    ("get", "/", None),
    ("get", "/health", None),
    ("post", "/setup", "02-setup.json"),
    ("post", "/predict", "03-predict-batch.json"),
    ("post", "/webhook", "07-webhook-annotation-created.json"),
]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def unloaded_client(settings: Settings):
    """The app without models: enough for auth, routing and limits, and fast."""
    predictor = Predictor(settings, MemoryStore(1 << 20))
    predictor.models = BackgroundLoader(lambda: threading.Event().wait(60))
    return create_app(settings, predictor).test_client()


# --- authentication -------------------------------------------------------------------------------


def test_bearer_token_guards_every_route_but_livez(settings):
    client = unloaded_client(replace(settings, bearer_token="tok-9f8e7d"))
    assert client.get("/livez").status_code == 200
    assert client.get("/livez").json == {"status": "alive"}
    for method, path, body_name in ROUTES:
        call = getattr(client, method)
        body = recorded(body_name) if body_name else None
        for header in [
            None,
            "Bearer wrong",
            "Bearer tok-9f8e7",
            "Bearer tok-9f8e7d0",
            "Token tok-9f8e7d",
            "tok-9f8e7d",
        ]:
            denied = call(path, json=body, headers={"Authorization": header} if header else {})
            assert denied.status_code == 401, (path, header)
            assert denied.json["error"] == "authentication required"
            assert denied.headers["WWW-Authenticate"] == 'Bearer realm="sam-backend"'
        allowed = call(path, json=body, headers={"Authorization": "Bearer tok-9f8e7d"})
        assert allowed.status_code != 401, path


def test_basic_and_bearer_are_both_accepted_when_both_are_set(settings):
    client = unloaded_client(
        replace(settings, basic_auth_user="ls", basic_auth_pass="pw:with:colons", bearer_token="t")
    )
    for header in [basic("ls", "pw:with:colons"), "Bearer t", "bearer t"]:
        assert client.get("/health", headers={"Authorization": header}).status_code == 200, header
    for header in [basic("ls", "pw"), basic("LS", "pw:with:colons"), "Basic !!notbase64", "Basic " + "bHM=", "Bearer "]:
        assert client.get("/health", headers={"Authorization": header}).status_code == 401, header
    challenge = client.get("/health").headers["WWW-Authenticate"]
    assert challenge == 'Basic realm="sam-backend", Bearer realm="sam-backend"'


@pytest.mark.parametrize(
    ("user", "password", "missing"), [("", "pw", "BASIC_AUTH_USER"), ("ls", "", "BASIC_AUTH_PASS")]
)
def test_half_a_basic_auth_credential_refuses_to_start(settings, user, password, missing):
    # A password alone used to leave every route open, and a user alone accepted `ls:` with no password.
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS") as refused:
        replace(settings, basic_auth_user=user, basic_auth_pass=password)
    assert f"{missing} is empty" in str(refused.value)


def test_credentials_never_reach_logs_or_answers(settings, label_studio, caplog):
    secrets = {"password": "pw-Secret-123", "token": "bearer-Secret-456"}
    pat = make_personal_access_token()
    configured = replace(
        settings, basic_auth_user="ls", basic_auth_pass=secrets["password"], bearer_token=secrets["token"]
    )
    client, _ = make_client(replace(configured, label_studio_api_key=pat))
    caplog.set_level(logging.DEBUG)
    bodies = []
    for header in [None, basic("ls", "wrong"), "Bearer wrong", "Bearer " + secrets["token"]]:
        bodies.append(client.post("/predict", json=interactive(KEYPOINTS), headers={"Authorization": header or ""}))
    label_studio.legacy_enabled = False
    try:
        legacy_client, _ = make_client(configured)  # Label Studio now refuses its legacy key
        bodies.append(
            legacy_client.post("/predict", json=interactive(KEYPOINTS), headers={"Authorization": "Bearer bad"})
        )
        bodies.append(
            legacy_client.post(
                "/predict", json=interactive(KEYPOINTS), headers={"Authorization": basic("ls", secrets["password"])}
            )
        )
    finally:
        label_studio.legacy_enabled = True
    assert [response.status_code for response in bodies] == [401, 401, 401, 200, 401, 422]
    everything = caplog.text + "".join(response.get_data(as_text=True) for response in bodies)
    for secret in [*secrets.values(), pat, settings.label_studio_api_key]:
        assert secret not in everything
    assert secrets["password"] not in repr(configured) and secrets["token"] not in repr(configured)


def test_urls_in_messages_lose_user_info_and_query_values():
    url = "https://user:hunter2@bucket.example/img.jpg?X-Amz-Signature=abc123&X-Amz-Credential=AKIA&d=keep/me"
    shown = redact_url(url)
    assert "hunter2" not in shown and "abc123" not in shown and "AKIA" not in shown
    assert shown.startswith("https://bucket.example/img.jpg?") and "d=keep%2Fme" in shown


SIGNATURES = ("S3SIGNATUREc0ffee", "AKIASECRETCREDENTIAL", "GCSSIGNATUREbeef")


def presigned(url: str) -> str:
    """`url` as a bucket's presigned link spells it: S3's credential and signature, GCS's signature."""
    return (
        f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SIGNATURES[1]}%2F20261207%2Fauto%2Fs3"
        f"&X-Amz-Expires=3600&X-Amz-Signature={SIGNATURES[0]}&X-Goog-Signature={SIGNATURES[2]}"
    )


def test_presigned_urls_lose_their_signatures_in_every_log_line_and_error(grounded_settings, label_studio, caplog):
    """Task images behind presigned links go through every path that names an image: a click that downloads (urllib3
    logs the request line at DEBUG), a click whose image is missing or on a host off the allow-list, a task opened
    whose pre-annotation goes on in the background, an imported task encoded ahead, and training finding that the
    URL now serves another image. No signature may reach a log line or an answer."""
    client, predictor = grounded_client(replace(grounded_settings, task_open_wait_s=0))
    caplog.set_level(logging.DEBUG)
    exists = presigned(label_studio.url.replace("127.0.0.1", "localhost") + "/car_512x384_http.jpg")
    missing = presigned("/data/upload/1/no-such-image.jpg")
    elsewhere = presigned("https://bucket.s3.amazonaws.com/voc.jpg")
    answers = []
    for url, status in [(exists, 200), (missing, 422), (elsewhere, 403)]:
        body = interactive(KEYPOINTS)
        body["tasks"][0]["data"]["image"] = url
        answers.append(client.post("/predict", json=body))
        assert answers[-1].status_code == status, answers[-1].json
    task_open = recorded("03a-predict-on-task-open.json")
    task_open["tasks"][0]["data"]["image"] = presigned(task_open["tasks"][0]["data"]["image"])
    answers.append(client.post("/predict", json=task_open))
    assert answers[-1].json == {"results": [[]]}  # goes on in the background
    assert client.application.extensions["backend"].task_opens.wait_idle(300)
    ImportedTasks(ProjectFiles(grounded_settings.model_dir, 1)).append([ImportedTask(7, missing)])
    predictor.encode_imports(1)
    assert predictor.ahead.wait_idle(300)
    with pytest.raises(ImageError) as moved:
        resources = predictor.training_resources()
        resources.embedding_for(resources.features(ProjectFiles(grounded_settings.model_dir, 1)), exists, "0" * 64)
    logged = caplog.text
    assert "goes on in the background" in logged and "not encoded ahead" in logged and "X-Amz-Signature=" in logged
    everything = logged + str(moved.value) + "".join(answer.get_data(as_text=True) for answer in answers)
    for secret in SIGNATURES:
        assert secret not in everything


# --- where images may come from -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["169.254.169.254", "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "10.1.2.3", "224.0.0.1"]
)
def test_allowed_host_resolving_to_an_internal_address_is_refused(settings, host):
    fetcher = ImageFetcher(
        FetchRules.of(replace(settings, allowed_image_hosts=(host.strip("[]"),), allow_private_image_hosts=False))
    )
    with pytest.raises(Exception) as caught:
        fetcher.fetch(f"http://{host}/latest/meta-data/")
    assert getattr(caught.value, "status", None) == 403, caught.value
    assert "may not reach" in str(caught.value)


def test_private_addresses_need_the_explicit_setting_and_link_local_never_passes(settings, label_studio):
    name = "localhost"
    url = label_studio.url.replace("127.0.0.1", name) + "/car_512x384_http.jpg"
    strict = ImageFetcher(
        FetchRules.of(replace(settings, allowed_image_hosts=(name,), allow_private_image_hosts=False))
    )
    with pytest.raises(Exception, match="loopback"):
        strict.fetch(url)
    relaxed = ImageFetcher(
        FetchRules.of(replace(settings, allowed_image_hosts=(name, "169.254.7.7"), allow_private_image_hosts=True))
    )
    assert relaxed.fetch(url).data[:2] == b"\xff\xd8"
    with pytest.raises(ImageError, match=r"169\.254\.7\.7 \(link-local\)"):
        relaxed.fetch("http://169.254.7.7/x.jpg")


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, ...
        "fd00:ec2::254",  # AWS over IPv6: unique-local, which ALLOW_PRIVATE_IMAGE_HOSTS lets through otherwise
        "100.100.100.200",  # Alibaba: carrier-grade NAT space
        "169.254.170.2",  # AWS ECS task credentials
        "fd20:ce::254",  # GCP, IPv6-only VMs
        "168.63.129.16",  # Azure's host agent: a public address
        "192.0.0.192",  # Oracle, legacy
        "::ffff:100.100.100.200",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_cloud_metadata_is_refused_by_the_address_check_even_with_private_hosts_allowed(settings, address):
    """The host is on the allow-list and private addresses are allowed: only the address check stands between a
    task's URL and the metadata service, and its reason names what the address is."""
    relaxed = ImageFetcher(
        FetchRules.of(replace(settings, allowed_image_hosts=(address,), allow_private_image_hosts=True))
    )
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(ImageError) as caught:
        relaxed.fetch(f"http://{host}/latest/meta-data/")
    assert caught.value.status == 403
    assert "(cloud metadata), which image downloads may not reach" in str(caught.value)
    assert "ALLOW_PRIVATE_IMAGE_HOSTS" not in str(caught.value)  # no setting would let it through


def test_label_studio_host_is_trusted_on_loopback(settings):
    fetcher = ImageFetcher(FetchRules.of(replace(settings, allowed_image_hosts=(), allow_private_image_hosts=False)))
    assert fetcher.fetch("/data/upload/1/voc.jpg").data[:2] == b"\xff\xd8"


def test_connection_goes_to_the_address_that_was_checked(settings, label_studio, monkeypatch):
    """A rebinding DNS answers a harmless address first and another one after: the fetch must connect
    to the first answer, resolving once, rather than let the HTTP client resolve the name again."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["127.0.0.1"])
    asked = []

    def rebinding_dns(host, port, *args, **kwargs):
        if host != "images.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        asked.append(host)
        return real_getaddrinfo(next(answers, "127.0.0.3"), port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    fetcher = ImageFetcher(
        FetchRules.of(replace(settings, allowed_image_hosts=("images.rebind.test",), allow_private_image_hosts=True))
    )
    port = label_studio.url.rsplit(":", 1)[1]
    image = fetcher.fetch(f"http://images.rebind.test:{port}/car_512x384_http.jpg")
    assert image.data[:2] == b"\xff\xd8"
    assert asked == ["images.rebind.test"]


def test_each_redirect_hop_is_checked_for_its_host_and_its_address(settings, label_studio):
    label_studio.redirects["/car_512x384_http.jpg"] = "http://[fd00:ec2::254]/latest/meta-data/"
    label_studio.redirects["/hop-to-elsewhere.jpg"] = "http://not-allowed.example/x.jpg"
    try:
        hosts = ("localhost", "fd00:ec2::254")
        fetcher = ImageFetcher(
            FetchRules.of(replace(settings, allowed_image_hosts=hosts, allow_private_image_hosts=True))
        )
        base = label_studio.url.replace("127.0.0.1", "localhost")
        with pytest.raises(ImageError, match=r"fd00:ec2::254 \(cloud metadata\)"):
            fetcher.fetch(base + "/car_512x384_http.jpg")
        with pytest.raises(ImageError, match="neither LABEL_STUDIO_URL nor in ALLOWED_IMAGE_HOSTS"):
            fetcher.fetch(base + "/hop-to-elsewhere.jpg")
    finally:
        label_studio.redirects.clear()


def test_only_http_schemes_are_fetched(settings):
    fetcher = ImageFetcher(FetchRules.of(settings))
    for url in ["file:///etc/passwd", "gopher://localhost/x", "ftp://localhost/x.jpg"]:
        with pytest.raises(Exception) as caught:
            fetcher.fetch(url)
        assert caught.value.status == 400


# --- local files ----------------------------------------------------------------------------------


@pytest.fixture
def local_root(tmp_path, media_root):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "inside.jpg").write_bytes((media_root / "local/e2e/car_320x240_local.jpg").read_bytes())
    (tmp_path / "secret.jpg").write_bytes(b"outside the root")
    (root / "link-out.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "dir-out").symlink_to(tmp_path)
    (root / "link-in.jpg").symlink_to(root / "sub" / "inside.jpg")
    return root


@pytest.mark.parametrize(
    ("d", "status"),
    [
        ("../secret.jpg", 403),
        ("sub/../../secret.jpg", 403),
        ("%2e%2e/secret.jpg", 403),  # decoded once by the query parser, as Label Studio does
        ("%2e%2e%2fsecret.jpg", 403),
        ("%252e%252e/secret.jpg", 404),  # a second decoding would make this a traversal
        ("link-out.jpg", 403),
        ("dir-out/secret.jpg", 403),
        ("/etc/passwd", 404),  # Label Studio strips the leading slash: a path below the root
        ("sub/inside.jpg%00.png", 400),
        ("sub", 404),
        ("x" * 5000, 422),
        ("", 400),
    ],
)
def test_local_files_outside_the_root_are_refused(settings, local_root, d, status):
    fetcher = ImageFetcher(FetchRules.of(replace(settings, local_files_document_root=str(local_root))))
    with pytest.raises(Exception) as caught:
        fetcher.fetch(f"/data/local-files/?d={d}")
    assert caught.value.status == status, caught.value


def test_local_files_inside_the_root_are_read_through_inner_links(settings, local_root):
    fetcher = ImageFetcher(FetchRules.of(replace(settings, local_files_document_root=str(local_root))))
    assert fetcher.fetch("/data/local-files/?d=sub/inside.jpg").data[:2] == b"\xff\xd8"
    assert fetcher.fetch("/data/local-files/?d=link-in.jpg").data[:2] == b"\xff\xd8"
    assert fetcher.fetch("/data/local-files/?d=sub%2Finside.jpg").data[:2] == b"\xff\xd8"


class TrickleServer:
    """A real HTTP server on loopback that sends its answer one byte every 0.5 s: the whole answer (`headers`)
    or, after prompt headers, its body; it counts what it got out before the client hung up."""

    PAYLOAD_BYTES = 20  # 10 s of trickle

    def __init__(self, trickle: str) -> None:
        self.trickle = trickle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow.jpg"
        self.sent: list[int] = []
        self.total = 0
        threading.Thread(target=self._serve_one, daemon=True).start()

    def _serve_one(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            body = b"\xff" * self.PAYLOAD_BYTES
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            if self.trickle == "body":
                connection.sendall(head)
                slow = body
            else:
                slow = head + body
            self.total = len(slow)
            sent = 0
            try:
                for byte in slow:
                    connection.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.5)
            except OSError:  # the client hung up
                pass
            self.sent.append(sent)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("trickle", ["body", "headers"])
def test_a_trickling_image_server_is_cut_off_at_download_timeout(settings, trickle):
    """Each byte comes well within the read timeout, so only a bound on the whole download ends it."""
    server = TrickleServer(trickle)
    fetcher = ImageFetcher(FetchRules.of(replace(settings, allowed_image_hosts=("127.0.0.1",), download_timeout_s=2.0)))
    try:
        with pytest.raises(Exception, match="DOWNLOAD_TIMEOUT") as caught:
            fetcher.fetch(server.url)
        assert caught.value.status == 504
        for _ in range(40):  # the server notices the hang-up at its next byte
            if server.sent:
                break
            time.sleep(0.25)
    finally:
        server.close()
    assert server.sent and server.sent[0] < server.total / 2, (server.sent, server.total)


# --- size and pixel caps --------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_downloads_stop_at_the_size_cap(settings, label_studio, chunked):
    fetcher = ImageFetcher(FetchRules.of(replace(settings, max_download_bytes=4_000)))
    url = (
        label_studio.url.replace("127.0.0.1", "localhost") + "/car_512x384_http.jpg" + ("?chunked=1" if chunked else "")
    )
    with pytest.raises(Exception, match="MAX_DOWNLOAD_BYTES") as caught:
        fetcher.fetch(url)
    assert caught.value.status == 413


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few hundred KB that inflate to width*height/8."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    compressed = b"".join(deflate.compress(row * 1000) for _ in range(height // 1000)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(50_000, 50_000)


def inflated_size(png: bytes) -> int:
    inflate, data, total = zlib.decompressobj(), png[41:-16], 0  # the one IDAT chunk's data
    while data:
        total += len(inflate.decompress(data, 1 << 26))
        data = inflate.unconsumed_tail
    return total


def test_png_declaring_50000x50000_is_refused_before_decoding(bomb):
    assert len(bomb) < 1_000_000 and inflated_size(bomb) > 300_000_000
    assert struct.unpack(">II", bomb[16:24]) == (50_000, 50_000)
    for cap in [40_000_000, 10_000_000_000]:  # a raised MAX_IMAGE_PIXELS leaves Pillow's own guard on
        with pytest.raises(Exception, match="decompression bomb") as caught:
            decode_image(bomb, cap)
        assert caught.value.status == 413


def test_images_above_max_image_pixels_are_refused_before_decoding():
    medium = png_bomb(8_000, 8_000)  # 64 Mpx: under Pillow's guard, above MAX_IMAGE_PIXELS
    with pytest.raises(Exception, match="MAX_IMAGE_PIXELS") as caught:
        decode_image(medium, 40_000_000)
    assert caught.value.status == 413
    assert decode_image(medium, 64_000_000).shape == (8_000, 8_000, 3)


def test_pixel_bomb_in_a_task_is_a_413_and_the_server_keeps_serving(settings, media_root, bomb, redis_url):
    (media_root / "upload" / "1" / "bomb.png").write_bytes(bomb)
    client, _ = make_client(replace(settings, redis_url=redis_url))
    response = client.post("/predict", json=interactive(KEYPOINTS, "/data/upload/1/bomb.png"))
    assert response.status_code == 413 and "decompression bomb" in response.json["error"]
    after = client.post("/predict", json=interactive(KEYPOINTS))
    assert after.status_code == 200


# --- request limits and deadlines -----------------------------------------------------------------


def test_request_size_tasks_and_prompts_are_capped(settings):
    client = unloaded_client(
        replace(settings, max_request_bytes=50_000, max_tasks_per_request=3, max_prompts_per_task=2)
    )
    big = json.dumps({"tasks": [{"data": {"image": "x" * 60_000}}]})
    too_big = client.post("/predict", data=big, content_type="application/json")
    assert too_big.status_code == 413 and "error" in too_big.json
    body = recorded("03-predict-batch.json")
    assert len(body["tasks"]) > 3
    too_many = client.post("/predict", json=body)
    assert too_many.status_code == 413 and "at most 3" in too_many.json["error"]


def test_too_many_prompts_in_one_task_is_413(client):
    body = interactive(KEYPOINTS)
    point = body["params"]["context"]["result"][0]
    body["params"]["context"]["result"] = [dict(point, id=str(i)) for i in range(101)]
    response = client.post("/predict", json=body)
    assert response.status_code == 413 and "at most 100" in response.json["error"]


def test_a_stalled_image_answers_503_with_retry_advice_and_the_retry_succeeds(settings, label_studio, redis_url):
    path = "/data/upload/1/e0d87ad7-car_640x480.jpg"
    client, _ = make_client(replace(settings, redis_url=redis_url, predict_deadline_s=1.0, download_timeout_s=30))
    label_studio.stalls[path] = 3.0
    try:
        stalled = client.post("/predict", json=interactive(KEYPOINTS, path))
    finally:
        del label_studio.stalls[path]
    assert stalled.status_code == 503
    assert stalled.headers["Retry-After"] == "5" and "PREDICT_DEADLINE" in stalled.json["error"]
    for _ in range(30):  # the stalled download finishes in the background and its embedding is cached
        retried = client.post("/predict", json=interactive(KEYPOINTS, path))
        if retried.status_code != 503:
            break
        time.sleep(1)
    assert retried.status_code == 200
    assert_brush_results(retried.json["results"][0]["result"], 640, 480, "Car")


def test_a_batch_past_its_deadline_keeps_what_finished_and_leaves_the_rest_unanswered(
    settings, label_studio, redis_url
):
    """A task that missed the deadline gets an empty list, which Label Studio stores no prediction for,
    so the next "Retrieve predictions" asks for it again; nothing is stored empty and lost."""
    stalled_path = "/data/upload/1/voc.jpg"
    client, _ = make_client(replace(settings, redis_url=redis_url, predict_deadline_s=3.0, download_timeout_s=30))
    body = interactive(KEYPOINTS)
    assert client.post("/predict", json=body).status_code == 200  # cached, so it fits in the deadline
    second = json.loads(json.dumps(body["tasks"][0]))
    second["id"], second["data"]["image"] = 999, stalled_path
    third = dict(second, id=1000)
    body["tasks"] += [second, third]
    label_studio.stalls[stalled_path] = 6.0
    try:
        response = client.post("/predict", json=body)
    finally:
        del label_studio.stalls[stalled_path]
    assert response.status_code == 200
    first, missed, skipped = response.json["results"]
    assert first["result"] and missed == [] and skipped == []
    assert [(error["task"], error["status"]) for error in response.json["errors"]] == [(999, 503), (1000, 503)]


@pytest.mark.parametrize(
    "binds, credentials, warned",
    [
        (["0.0.0.0:9090"], {}, True),
        (["[::]:9090"], {}, True),
        (["backend.example:9090"], {}, True),
        (["127.0.0.1:9090"], {}, False),
        (["localhost:9090", "[::1]:9090", "unix:/run/sam.sock"], {}, False),
        (["0.0.0.0:9090"], {"basic_auth_user": "ls", "basic_auth_pass": "s3cret"}, False),
        (["0.0.0.0:9090"], {"bearer_token": "t0ken"}, False),
    ],
)
def test_listening_beyond_this_machine_without_credentials_is_warned_of(binds, credentials, warned):
    from backend.http.access import open_to_the_network

    warning = open_to_the_network(binds, Settings(**credentials))
    assert (warning is not None) == warned
    if warned:
        assert binds[0] in warning and "BASIC_AUTH_USER" in warning and "HOST=127.0.0.1" in warning


def test_gunicorn_on_all_interfaces_without_auth_warns_once_at_start(sam_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    from tests.assets import REPO
    from tests.services import free_port

    env = dict(os.environ, HOST="0.0.0.0", PORT=str(free_port()), WORKERS="2", SAM_CHECKPOINT=str(sam_checkpoint))
    env.update(MODEL_DIR=str(tmp_path / "models"), WEIGHTS_DIR=str(tmp_path / "weights"), REDIS_URL="")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "backend.wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 120
        while log_path.read_text().count("Booting worker") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warnings = [line for line in log_path.read_text().splitlines() if "without authentication" in line]
    assert len(warnings) == 1 and "0.0.0.0:" in warnings[0]
