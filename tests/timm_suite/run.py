#!/usr/bin/env python
"""Run timm's own generic model tests (tests/test_models.py of the timm sdist) on the litv2 models.

    python tests/timm_suite/run.py [extra pytest args, e.g. -k forward_fx -x --durations=0]

The timm sdist matching the installed timm (pinned below) is fetched with ``pip download`` into
``.cache/timm-<version>/`` (git-ignored) and reused while it verifies: the tarball's sha256 is
pinned, and the extracted files are checked against the manifest written last. A download goes to
a temp dir next to the cache and is renamed into place only once complete, so an interrupted or
failed fetch never leaves a cache that looks valid. ``TIMM_SDIST=/path/timm-<version>.tar.gz``
uses a local tarball instead of the network (still sha256-checked).

pytest runs with ``-c tests/timm_suite/pytest-timm.ini`` (not the repo's pyproject options) and
``-p litv2_timm_plugin`` (registers litv2 and restricts timm's parametrized lists to it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TIMM_VERSION = "1.0.31"
# sha256 of timm-1.0.31.tar.gz as served by PyPI
SDIST_SHA256 = "baa0b333339c46d3d6d4965d99b69f5053afed71210e8f433d7ea5ee6a18f0ec"
# what is kept from the sdist: timm's test dir plus its pyproject (markers) and license
KEEP = ("tests/", "pyproject.toml", "LICENSE", "PKG-INFO")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE_ROOT = REPO / ".cache"
CACHE = CACHE_ROOT / f"timm-{TIMM_VERSION}"
MANIFEST = "MANIFEST.json"
TEST_FILE = Path("tests") / "test_models.py"


def log(msg: str) -> None:
    print(f"[timm_suite] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_ok(root: Path) -> bool:
    """True when ``root`` holds a complete extraction: manifest present, every listed file matches."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("sdist_sha256") != SDIST_SHA256 or manifest.get("version") != TIMM_VERSION:
        return False
    files = manifest.get("files") or {}
    if str(TEST_FILE) not in files:
        return False
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file() or sha256(path) != digest:
            return False
    return True


def fetch_sdist(dest: Path) -> Path:
    """The verified sdist tarball, from $TIMM_SDIST or ``pip download`` into ``dest``."""
    local = os.environ.get("TIMM_SDIST")
    if local:
        tarball = Path(local)
        log(f"using local sdist {tarball}")
    else:
        log(f"downloading timm=={TIMM_VERSION} sdist with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"timm=={TIMM_VERSION}"]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"[timm_suite] pip download of timm=={TIMM_VERSION} failed (network? set "
                             f"TIMM_SDIST to a local timm-{TIMM_VERSION}.tar.gz)")
        tarball = dest / f"timm-{TIMM_VERSION}.tar.gz"
    if not tarball.is_file():
        raise SystemExit(f"[timm_suite] sdist not found at {tarball}")
    digest = sha256(tarball)
    if digest != SDIST_SHA256:
        raise SystemExit(f"[timm_suite] sha256 mismatch for {tarball}: {digest} != {SDIST_SHA256}")
    return tarball


def extract(tarball: Path, stage: Path) -> None:
    prefix = f"timm-{TIMM_VERSION}/"
    files = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if not rel.startswith(KEEP) or ".." in Path(rel).parts or Path(rel).is_absolute():
                continue
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            files[rel] = sha256(target)
    if str(TEST_FILE) not in files:
        raise SystemExit(f"[timm_suite] {tarball} has no {prefix}{TEST_FILE}")
    # written last: its presence (with matching hashes) is what marks the cache complete
    (stage / MANIFEST).write_text(json.dumps(
        {"version": TIMM_VERSION, "sdist_sha256": SDIST_SHA256, "files": files}, indent=1, sort_keys=True))


def ensure_cache() -> Path:
    if cache_ok(CACHE):
        return CACHE
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    for stale in CACHE_ROOT.glob(f".{CACHE.name}.tmp-*"):  # left by a killed run (older than an hour)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE.name}.tmp-", dir=CACHE_ROOT))
    try:
        stage = tmp / "stage"
        stage.mkdir()
        tarball = fetch_sdist(tmp / "download")
        extract(tarball, stage)
        if not cache_ok(stage):
            raise SystemExit("[timm_suite] extracted sdist failed verification")
        if CACHE.exists():  # stale / partial / other version: move aside, then drop
            log(f"replacing invalid cache {CACHE}")
            CACHE.rename(tmp / "old")
        try:
            stage.rename(CACHE)
        except OSError:
            if not cache_ok(CACHE):  # lost a race to a concurrent run that produced a bad cache
                raise
        log(f"cached timm {TIMM_VERSION} tests in {CACHE.relative_to(REPO)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CACHE


def check_timm_version() -> None:
    from importlib.metadata import version

    installed = version("timm")
    if installed != TIMM_VERSION:
        raise SystemExit(f"[timm_suite] installed timm is {installed}, this runner pins timm "
                         f"{TIMM_VERSION}'s test file; update TIMM_VERSION and SDIST_SHA256 in "
                         f"{Path(__file__).name}")


def main(argv: list[str]) -> int:
    check_timm_version()
    cache = ensure_cache()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    # timm's file drops test_model_forward_fx_torchscript (and changes some filters) under GitHub
    # Actions; run the same tests locally and in CI
    env.pop("GITHUB_ACTIONS", None)
    cmd = [
        sys.executable, "-m", "pytest",
        "-c", str(HERE / "pytest-timm.ini"),
        "--rootdir", str(REPO),
        "--confcutdir", str(cache / "tests"),  # load timm's tests/conftest.py only, as timm's CI does
        "--import-mode=importlib",  # no sys.path insertion: the cached tests/ can't shadow anything
        "-p", "litv2_timm_plugin",
        str((cache / TEST_FILE).relative_to(REPO)),
        *argv,
    ]
    log("running: " + " ".join(cmd))
    return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
