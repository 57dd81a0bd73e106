#!/usr/bin/env python3
"""The inputs of an offline image build: Debian base images made here, and a wheelhouse.

    python -m deploy.docker_images [--rebuild] [--torch SPEC] [--pip-arg ARG]...

No registry is needed: Docker Hub may be unreachable (it is on CI machines and air-gapped GPU
clusters), so nothing is pulled.

* **Base images**, from Debian's packages with ``debootstrap --variant=minbase bookworm``,
  imported with ``docker import``:
  ``llama2rwkv-base:bookworm`` (Python 3.11 in a venv at /opt/venv, first on PATH, and g++ and
  the Python headers for the C++ ops DeepSpeed compiles at run time) is the ``BASE_IMAGE`` of
  docker/Dockerfile's offline flavour (CPU torch from the wheelhouse; a CUDA torch wheel works
  the same way); ``llama2rwkv-prometheus:bookworm`` is Debian's ``prometheus``
  package, run as its own user, for compose's prometheus service.
* **The wheelhouse** ``docker/wheelhouse/``: every Python dependency of the image as a wheel
  (``pip wheel`` of docker/requirements.txt, torch and setuptools, on this host, which must run
  the image's Python version), so the Dockerfile installs with ``pip install --no-index``.

Each is keyed by its inputs (package lists and recipe for a base image; requirements, torch
spec, pip arguments and Python version for the wheelhouse): an image ``…:bookworm-<key>`` that
exists, or a wheelhouse under ``~/.cache/llama2rwkv/wheelhouse/<key>``, is reused; the
``:bookworm`` tags point at the current keys. ``--rebuild`` makes them again (e.g. for Debian's
security updates). Needs root (debootstrap, chroot), Docker and, for the wheelhouse, pip.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE_PYTHON = "3.11"  # Debian 12's python3
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2rwkv"
WHEELHOUSE = ROOT / "docker" / "wheelhouse"
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
DEFAULT_TORCH = "torch==2.13.0"
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")  # pyproject's build backend, offline
VENV_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Bump "recipe" when the steps below change in a way the package lists do not show.
BASES = {
    "llama2rwkv-base": {
        "recipe": 1,
        "packages": ["python3", "python3-venv", "python3-dev", "g++"],
        "venv": "/opt/venv",
        "changes": [f"ENV PATH={VENV_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python"]'],
    },
    "llama2rwkv-prometheus": {
        "recipe": 1,
        "packages": ["prometheus"],
        "data_dir": ("/prometheus", "prometheus"),
        "changes": ["USER prometheus", "WORKDIR /prometheus",
                    'ENTRYPOINT ["/usr/bin/prometheus"]',
                    'CMD ["--config.file=/etc/prometheus/prometheus.yml", '
                    '"--storage.tsdb.path=/prometheus"]', "EXPOSE 9090"],
    },
}
SUITE_TAG = SUITE  # llama2rwkv-base:bookworm, llama2rwkv-base:bookworm-<key>


class ImageError(RuntimeError):
    """A step failed; the message names it and what to do."""


def say(text: str) -> None:
    print(f"docker_images: {text}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + shlex.join(str(c) for c in cmd))
    done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, check=False,
                          **kw)
    if done.returncode != 0:
        raise ImageError(f"{cmd[0]} failed ({done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return done


def key_of(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                          check=False).returncode == 0


# --------------------------------------------------------------------------- base images
def base_key(name: str) -> str:
    return key_of({"suite": SUITE, "name": name, **BASES[name]})


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        raise ImageError("debootstrap and chroot need root: run as root (or sudo)")
    if shutil.which("debootstrap") is None:
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _owner_ids(rootfs: Path, user: str) -> tuple[int, int]:
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ImageError(f"user {user!r} not in {rootfs}/etc/passwd")


def build_base(name: str, workdir: Path) -> str:
    """debootstrap + the recipe's steps + docker import; returns the keyed tag."""
    recipe = BASES[name]
    tag = f"{name}:{SUITE_TAG}-{base_key(name)}"
    rootfs = workdir / name
    debs = CACHE / "debootstrap-debs"
    debs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run(["debootstrap", "--variant=minbase", "--include=" + ",".join(recipe["packages"]),
         f"--cache-dir={debs}", SUITE, rootfs, MIRROR])
    if "venv" in recipe:
        run(["chroot", rootfs, "/usr/bin/python3", "-m", "venv", recipe["venv"]])
    if "data_dir" in recipe:
        path, user = recipe["data_dir"]
        target = rootfs / path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        os.chown(target, *_owner_ids(rootfs, user))
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    changes = [a for c in recipe["changes"] for a in ("--change", c)]
    label = f"LABEL org.opencontainers.image.description=\"{name}: Debian {SUITE} minbase " \
            f"+ {' '.join(recipe['packages'])} (deploy/docker_images.py)\""
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                           stdout=subprocess.PIPE)
    say(f"$ tar -C {rootfs} -c . | docker import ... - {tag}")
    done = subprocess.run(["docker", "import", *changes, "--change", label, "-", tag],
                          stdin=tar.stdout, capture_output=True, text=True, check=False)
    tar.stdout.close()
    if tar.wait() != 0 or done.returncode != 0:
        raise ImageError(f"docker import of {rootfs} failed: {done.stderr[-2000:]}")
    say(f"{tag}: built in {time.monotonic() - t0:.0f} s")
    return tag


def missing_bases() -> list[str]:
    """Base images whose keyed tag does not exist yet (building them needs root)."""
    return [n for n in BASES if not image_exists(f"{n}:{SUITE_TAG}-{base_key(n)}")]


def ensure_bases(rebuild: bool = False) -> dict[str, str]:
    """Every base image, built when its keyed tag is missing; ``name:bookworm`` points at it."""
    tags: dict[str, str] = {}
    missing = list(BASES) if rebuild else missing_bases()
    if missing:
        _need_root_tools()
    with tempfile.TemporaryDirectory(prefix="llama2rwkv-rootfs-", dir="/var/tmp") as tmp:
        for name in BASES:
            keyed = f"{name}:{SUITE_TAG}-{base_key(name)}"
            if name in missing:
                build_base(name, Path(tmp))
            else:
                say(f"{keyed}: reused")
            run(["docker", "tag", keyed, f"{name}:{SUITE_TAG}"])
            tags[name] = f"{name}:{SUITE_TAG}"
    return tags


# --------------------------------------------------------------------------- wheelhouse
def wheelhouse_key(torch: str, pip_args: list[str], image_python: str = IMAGE_PYTHON) -> str:
    return key_of({"requirements": REQUIREMENTS.read_text(), "torch": torch,
                   "build": BUILD_REQUIREMENTS, "pip_args": pip_args, "python": image_python})


def ensure_wheelhouse(python: str, torch: str, pip_args: list[str], rebuild: bool = False,
                      image_python: str = IMAGE_PYTHON) -> Path:
    """Fill the keyed wheelhouse (pip wheel) if missing; link its wheels into docker/wheelhouse."""
    version = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    if version.stdout.strip() != image_python:
        raise ImageError(f"{python} is Python {version.stdout.strip()}, but the image runs "
                         f"Python {image_python}: its wheels would not install. Pass --python "
                         f"with a Python {image_python} (--image-python names another base's).")
    key = wheelhouse_key(torch, pip_args, image_python)
    cached = CACHE / "wheelhouse" / key
    if rebuild and cached.exists():
        shutil.rmtree(cached)
    if not (cached / "COMPLETE").is_file():
        partial = cached.with_name(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        t0 = time.monotonic()
        run([python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", partial, *pip_args,
             "-r", REQUIREMENTS, *([torch] if torch else []), *BUILD_REQUIREMENTS])
        (partial / "COMPLETE").write_text(json.dumps({"torch": torch, "pip_args": pip_args})
                                          + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        partial.rename(cached)
        say(f"wheelhouse {cached}: filled in {time.monotonic() - t0:.0f} s")
    else:
        say(f"wheelhouse {cached}: reused")
    wheels = sorted(cached.glob("*.whl"))
    for old in WHEELHOUSE.glob("*.whl"):
        if old.name not in {w.name for w in wheels}:
            old.unlink()
    for wheel in wheels:
        dest = WHEELHOUSE / wheel.name
        if dest.exists() and dest.stat().st_size == wheel.stat().st_size:
            continue
        dest.unlink(missing_ok=True)
        try:
            os.link(wheel, dest)
        except OSError:
            shutil.copy2(wheel, dest)
    (WHEELHOUSE / "KEY").write_text(key + "\n")
    return cached


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rebuild", action="store_true", help="make the bases and wheelhouse again")
    ap.add_argument("--torch", default=os.environ.get("TORCH_SPEC") or DEFAULT_TORCH,
                    help=f"torch requirement for the wheelhouse (env TORCH_SPEC; default "
                         f"{DEFAULT_TORCH}: a CPU build where pip finds one; '' for none, when "
                         "the base image has torch)")
    ap.add_argument("--pip-arg", action="append", default=shlex.split(os.environ.get(
        "PIP_EXTRA", "")), help="extra pip argument, e.g. --extra-index-url=URL (env PIP_EXTRA)")
    ap.add_argument("--python", default=sys.executable,
                    help=f"Python {IMAGE_PYTHON} whose pip fills the wheelhouse")
    ap.add_argument("--image-python", default=IMAGE_PYTHON,
                    help=f"Python version of the base image (default {IMAGE_PYTHON}, ours)")
    ap.add_argument("--skip-bases", action="store_true", help="only the wheelhouse")
    args = ap.parse_args(argv)
    try:
        if not args.skip_bases:
            for tag in ensure_bases(args.rebuild).values():
                say(f"{tag} ready")
        ensure_wheelhouse(args.python, args.torch, args.pip_arg, args.rebuild, args.image_python)
    except ImageError as err:
        say(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
