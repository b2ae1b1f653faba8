"""Where released weights come from: torch.hub's cache, timm's download helper, and one-line errors.

``timm.create_model(name, pretrained=True)`` of a litv2 model loads the file its pretrained cfg's ``url`` names
through timm's own ``load_pretrained`` (``checkpoint_filter_fn``, classifier adaptation, strict load). Before
timm loads it, :func:`fetch` puts it in torch.hub's cache (``$TORCH_HOME/hub/checkpoints/<file name>``, or
``cache_dir=``) with timm's ``download_cached_file`` and a progress bar; a cached file is not downloaded again.
What this adds to timm's path:

* a download that fails (no network, an HTTP error, a server that stalls for ``timeout_s``) raises
  :class:`~litv2.errors.WeightsError`: one line that names the URL and how to pass a local copy instead;
* a file in the cache that does not load (a truncated or corrupt download: torch.hub moves whatever it received
  into the cache) is removed and raises :class:`~litv2.errors.WeightsError`, so the next call downloads it again.
"""
from __future__ import annotations

import http.client
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from litv2.errors import WeightsError

__all__ = ["is_url", "weights_url", "cached_path", "fetch", "check_loadable", "loading"]

# A download whose server sends nothing for this long (to connect, or mid-file) fails instead of hanging the job.
DOWNLOAD_TIMEOUT_S = 60.0


def is_url(location) -> bool:
    return isinstance(location, str) and urlparse(location).scheme in ("http", "https", "ftp", "file")


def weights_url(pretrained_cfg: dict) -> str | None:
    """The URL timm's ``load_pretrained`` downloads for this cfg, or None when it loads from somewhere else
    (an in-memory state dict, a ``file``, a local dir, the Hugging Face hub) or has no weights."""
    if pretrained_cfg.get("source") in ("hf-hub", "local-dir"):
        return None
    if any(pretrained_cfg.get(k) for k in ("state_dict", "file", "hf_hub_id")):
        return None
    url = pretrained_cfg.get("url")
    return url if isinstance(url, str) and url else None


def cached_path(url: str, cache_dir=None) -> Path:
    """Where torch.hub / timm keep ``url``: ``<cache_dir or $TORCH_HOME/hub/checkpoints>/<basename>``."""
    from timm.models._hub import get_cache_dir

    return Path(cache_dir or get_cache_dir()) / os.path.basename(urlparse(url).path)


def _reason(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextmanager
def _socket_timeout(seconds: float | None):
    """torch.hub's download opens its connection without a timeout: give the sockets made meanwhile one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(url: str, cache_dir=None, progress: bool = True, hint: str = "",
          timeout_s: float | None = DOWNLOAD_TIMEOUT_S) -> Path:
    """The cached copy of ``url``, downloaded first if absent (timm's ``download_cached_file``: a temp file renamed
    into the cache once complete). A failed download, or a server silent for ``timeout_s`` seconds, raises
    WeightsError naming the URL, followed by ``hint``; nothing is left in the cache."""
    from timm.models._hub import download_cached_file

    try:
        with _socket_timeout(timeout_s):
            return Path(download_cached_file(url, check_hash=False, progress=progress, cache_dir=cache_dir))
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError / HTTPError / socket errors are OSErrors
        hint = hint or "download the file yourself and pass its path instead"
        stalled = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
        why = f"the server sent nothing for {timeout_s:g} s" if stalled else _reason(e)
        raise WeightsError(f"cannot download {url} ({why}); {hint}") from None


def check_loadable(path: Path, url: str | None = None) -> dict:
    """``torch.load(path, weights_only=True)``; a file that does not load is removed (it is a cached download that
    went wrong) and raises WeightsError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        path.unlink(missing_ok=True)
        source = f"the download of {url}" if url else f"{path}"
        raise WeightsError(f"{source} is truncated or corrupt ({_reason(e)}); removed {path} from the cache, "
                           f"the next attempt downloads it again") from None
    if not isinstance(state, dict):
        path.unlink(missing_ok=True)
        raise WeightsError(f"{url or path} holds no state dict (got {type(state).__name__}); removed {path}")
    return state


@contextmanager
def loading(url: str, cache_dir=None, progress: bool = True, hint: str = ""):
    """Fetch ``url`` into the cache, then run the body (timm's loader, which finds it there). If the body fails and
    the cached file does not load, the file is removed and WeightsError raised instead; any other failure (a file
    that loads but does not fit the model) propagates as it is and leaves the file in the cache."""
    path = fetch(url, cache_dir, progress, hint)
    try:
        yield path
    except WeightsError:
        raise
    except Exception:
        if path.exists():
            check_loadable(path, url)  # raises (and removes the file) when the download is what failed
        raise
