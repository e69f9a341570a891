"""The Docker stage's machinery, a test measure only: a Docker engine when none runs, stand-in base images when no
image registry can be reached, and this machine's pip sources served to the image builds.

Users pull the real base images (python:3.11-slim-bookworm, redis:7). Where the registry is unreachable (CI), a
Debian bookworm root file system made by `debootstrap` stands in for both: bookworm's own python3 is 3.11, and the
Dockerfiles put their packages in a venv at a fixed path, so they build the same on either. The stand-in carries
this machine's CA certificates and a pip configuration that points at this machine's package sources (the index
it reaches, plus local indexes and wheel folders served over HTTP on the Docker bridge), so that pip inside a build
resolves exactly what pip here does.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

PYTHON_IMAGE = "python:3.11-slim-bookworm"
REDIS_IMAGE = "redis:7"
DATA_ROOT = Path(os.environ.get("DOCKER_DATA_ROOT", "/var/lib/docker-ci"))
CACHE = Path(os.environ.get("DOCKER_CI_CACHE", "/var/cache/sam-backend-ci"))
# The root file system, made once and kept: debootstrap takes minutes.
ROOTFS_TARBALL = CACHE / "bookworm-python3-redis.tar"
STANDIN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,redis-server"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MIRROR_PORT = int(os.environ.get("DOCKER_CI_PIP_PORT", "3141"))


def run(*command: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """A command whose output the stage's log shows on failure."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def engine_answers() -> bool:
    return shutil.which("docker") is not None and run("docker", "info", check=False, timeout_s=60).returncode == 0


def install_debian_packages(*packages: str) -> None:
    """Debian's `packages`: the tools of this stage that a fresh machine lacks."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def ensure_engine() -> None:
    """A Docker engine and Compose: those installed, or Debian's docker.io and docker-compose started on a data
    root of their own (overlay2)."""
    if engine_answers() and compose_command():
        return
    missing = [
        package
        for package, there in (("docker.io", shutil.which("dockerd")), ("docker-compose", compose_command()))
        if not there
    ]
    if missing:
        install_debian_packages(*missing)
        compose_command.cache_clear()  # it answered before the install
    if engine_answers():
        return
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    log = open(DATA_ROOT.parent / "dockerd-ci.log", "a")  # noqa: SIM115 (the daemon outlives this process)
    command = ["dockerd", "--data-root", str(DATA_ROOT), "--storage-driver", "overlay2"]
    subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 90
    while not engine_answers():
        if time.time() > deadline:
            raise RuntimeError(f"dockerd did not answer within 90 s; see {log.name}")
        time.sleep(1)


@functools.cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` (v2, Docker's own packages) when present, else Debian's `docker-compose` (1.29)."""
    if shutil.which("docker") and run("docker", "compose", "version", check=False).returncode == 0:
        return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return ()


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge: what build steps and containers reach this machine at."""
    address = run("ip", "-4", "-o", "addr", "show", "docker0").stdout.split()  # the default bridge's interface
    return address[address.index("inet") + 1].partition("/")[0]


def image_present(name: str) -> bool:
    return run("docker", "image", "inspect", name, check=False).returncode == 0


# ---- pip sources ------------------------------------------------------------------------------------------------


def local_pip_sources() -> dict[str, list[str]]:
    """pip's index-url, extra-index-url and find-links settings here (config files and PIP_* variables)."""
    listed = run(sys.executable, "-m", "pip", "config", "list").stdout.splitlines()
    sources: dict[str, list[str]] = {}
    for line in listed:
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        if name in ("index-url", "extra-index-url", "find-links"):
            for location in value.strip("'\"").split():
                if location not in sources.setdefault(name, []):
                    sources[name].append(location)
    return sources


def local_path(location: str) -> Path | None:
    """The folder a pip source names on this disk (a path or a file:// URL); None for a remote index."""
    if location.startswith("file://"):
        return Path(unquote(urlsplit(location).path))
    if "://" not in location:
        return Path(location)
    return None


def served_roots(sources: dict[str, list[str]]) -> list[Path]:
    """The folders the mirror may serve: each local find-links folder, and each local index's parent (a simple
    index links its files as ../../files/...)."""
    roots = []
    for name, locations in sources.items():
        for location in locations:
            path = local_path(location)
            if path is not None and path.is_dir():
                roots.append(path.parent if name != "find-links" else path)
    return roots


def standin_pip_config(sources: dict[str, list[str]], gateway: str) -> str:
    """/etc/pip.conf of the stand-in base: this machine's sources, its local folders through the mirror."""

    def reachable(location: str) -> str:
        path = local_path(location)
        return location if path is None else f"http://{gateway}:{MIRROR_PORT}{path.resolve()}/"

    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt", f"trusted-host = {gateway}"]
    for name, locations in sources.items():
        lines.append(f"{name} = {' '.join(reachable(location) for location in locations)}")
    return "\n".join(lines) + "\n"


class PipMirror:
    """This machine's local pip folders over HTTP on the Docker bridge, for the builds; nothing outside them."""

    def __init__(self, roots: list[Path], host: str, port: int = MIRROR_PORT) -> None:
        allowed = [root.resolve() for root in roots]

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                target = Path(super().translate_path(path)).resolve()
                inside = any(target == root or root in target.parents for root in allowed)
                return str(target) if inside else "/nonexistent"

            def log_message(self, *args: object) -> None:  # the builds' own logs say what they fetched
                pass

        handler = functools.partial(Handler, directory="/")
        self.server = http.server.ThreadingHTTPServer((host, port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PipMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- base images -------------------------------------------------------------------------------------------------


def pullable(image: str) -> bool:
    return run("docker", "pull", "-q", image, check=False, timeout_s=900).returncode == 0


def make_rootfs_tarball() -> None:
    """Debian bookworm with Python 3.11, its venv module and redis-server, as a tarball (kept in CACHE)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = "http://deb.debian.org/debian"
    if shutil.which("debootstrap") is None:  # a machine whose Docker came installed has no reason to have it
        install_debian_packages("debootstrap")
    run("debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}", "bookworm", str(rootfs), mirror)
    run("chroot", str(rootfs), "apt-get", "clean")
    partial = ROOTFS_TARBALL.with_suffix(".partial")
    run("tar", "-C", str(rootfs), "-cf", str(partial), ".")
    partial.rename(ROOTFS_TARBALL)
    shutil.rmtree(rootfs)


# What the official redis image's entry point does that the compose file relies on: a server started without a
# config file accepts other containers (Debian's redis-server would refuse them: protected mode).
REDIS_ENTRYPOINT = b"""#!/bin/sh
if [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi
exec "$@"
"""


def import_standin(image: str, command: list[str], extra_files: dict[str, bytes], entrypoint: str = "") -> None:
    """`image` made from the cached root file system plus `extra_files` (path in the image -> content)."""
    rootfs_image = "sam-backend-ci/bookworm-rootfs"
    if not image_present(rootfs_image):
        run("docker", "import", str(ROOTFS_TARBALL), rootfs_image)
    context = CACHE / "standin-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    lines = [
        f"FROM {rootfs_image}",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8",
        f"CMD {json.dumps(command)}",
        *([f'ENTRYPOINT ["sh", "{entrypoint}"]'] if entrypoint else []),
    ]
    for index, (path, content) in enumerate(extra_files.items()):
        (context / str(index)).write_bytes(content)
        lines.append(f"COPY {index} {path}")
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    run("docker", "build", "-q", "-t", image, str(context))
    shutil.rmtree(context)


def ensure_base_images(gateway: str, sources: dict[str, list[str]]) -> list[str]:
    """The Dockerfiles' and the compose file's base images: pulled, or stand-ins made here. The stand-ins made."""
    made = []
    for image, command in ((PYTHON_IMAGE, ["python3"]), (REDIS_IMAGE, ["redis-server"])):
        if image_present(image) or pullable(image):
            continue
        if not ROOTFS_TARBALL.exists():
            make_rootfs_tarball()
        if image == PYTHON_IMAGE:
            extra = {
                "/etc/ssl/certs/ca-certificates.crt": HOST_CA_BUNDLE.read_bytes(),
                "/etc/pip.conf": standin_pip_config(sources, gateway).encode(),
            }
            import_standin(image, command, extra)
        else:
            entrypoint = "/usr/local/bin/docker-entrypoint.sh"
            import_standin(image, command, {entrypoint: REDIS_ENTRYPOINT}, entrypoint)
        made.append(image)
    return made
