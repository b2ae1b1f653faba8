"""A run's starting weights, fetched and checked before any other work.

Three sources: ``model.pretrained=true`` (``pretrained=true`` for eval.py): the model's released weights, the URL
in its timm pretrained cfg (``model.pretrained_cfg`` picks another tag, ``model.pretrained_cfg_overlay`` overrides
fields, e.g. ``url`` or ``file``); ``trainer.init_from`` (train.py) and ``checkpoint`` (eval.py): a file or a URL.
A URL is downloaded into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) with a progress bar, once; the
model itself is built later, by timm, which then finds the file there.

:func:`fetch_start_weights` runs right after the config checks, before the data, the run dir or the model exist:
a failed download, a corrupt file, or weights trained with another HiLo alpha end the command with one line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from litv2 import hub
from litv2.errors import UserError

from .checkpoint import FORMAT, load_file

_LOCAL_COPY = {
    "pretrained": "download it yourself and pass the file with ++model.pretrained_cfg_overlay.file=/path/{file} "
                  "(or trainer.init_from=/path/{file} with model.pretrained=false)",
    "init_from": "download it yourself and pass trainer.init_from=/path/{file}",
    "checkpoint": "download it yourself and pass checkpoint=/path/{file}",
    "eval_pretrained": "download it yourself and pass checkpoint=/path/{file} instead of pretrained=true",
}


def _hint(kind: str, url: str) -> str:
    return _LOCAL_COPY[kind].format(file=url.rsplit("/", 1)[-1] or "weights.pth")


def pretrained_url(cfg) -> str | None:
    """The URL timm's ``load_pretrained`` will download for ``cfg.model`` (None: no download, e.g. a ``file``)."""
    from timm.models import resolve_pretrained_cfg

    from .builders import model_kwargs

    kw = model_kwargs(cfg.model)
    try:
        pcfg = resolve_pretrained_cfg(cfg.model.name, kw.get("pretrained_cfg"), kw.get("pretrained_cfg_overlay"))
    except TypeError as e:  # an overlay field PretrainedCfg does not have
        raise UserError(f"model.pretrained_cfg_overlay: {e}") from None
    if not pcfg.has_weights:
        raise UserError(f"model {cfg.model.name} has no pretrained weights (its pretrained cfg names no file or URL)")
    return hub.weights_url(pcfg.to_dict())


def local_copy(location: str, kind: str, timeout_s: float | None = hub.DOWNLOAD_TIMEOUT_S) -> Path:
    """A checkpoint location as a local file: a URL is fetched into the cache (once) and checked to load."""
    if not hub.is_url(location):
        return Path(location)
    path = hub.fetch(location, hint=_hint(kind, location), timeout_s=timeout_s)
    hub.check_loadable(path, location)
    return path


def fetch_start_weights(cfg, command: str = "train") -> Path | None:
    """Fetch and check the weights a run starts from; returns the local file for trainer.init_from / checkpoint.

    ``command``: ``"train"`` (model.pretrained, trainer.init_from) or ``"eval"`` (pretrained, checkpoint).
    """
    if command == "train":
        pretrained, location, kind = bool(cfg.model.get("pretrained", False)), cfg.trainer.init_from, "init_from"
    else:
        pretrained, location, kind = eval_pretrained(cfg), cfg.get("checkpoint"), "checkpoint"
    timeout_s = cfg.trainer.get("download_timeout_s", hub.DOWNLOAD_TIMEOUT_S)
    if pretrained and location is not None:
        key = "trainer.init_from" if command == "train" else "checkpoint"
        raise UserError(f"{'model.' if command == 'train' else ''}pretrained=true and {key}={location} both give the "
                        f"starting weights: set one of them")
    if pretrained:
        url = pretrained_url(cfg)
        if url is not None:
            path = hub.fetch(url, hint=_hint("pretrained" if command == "train" else "eval_pretrained", url),
                             timeout_s=timeout_s)
            check_fits(cfg, hub.check_loadable(path, url), url)
        return None
    if location is None:
        return None
    path = local_copy(str(location), kind, timeout_s)
    if command == "train":  # eval.py reads its checkpoint (and the run config in it) itself, next
        state = load_file(path)
        check_fits(cfg, state["model"] if state.get("format") == FORMAT else state, location)
    return path


def eval_pretrained(cfg) -> bool:
    """eval.py: ``pretrained=true`` or ``model.pretrained=true``."""
    return bool(cfg.get("pretrained", False)) or bool(cfg.model.get("pretrained", False))


def check_fits(cfg, state_dict: dict, source) -> None:
    """The HiLo split check of :func:`litv2.models.checkpoint_filter_fn` on the configured model, built on the meta
    device (no memory, no initialisation), so weights trained with another alpha stop the run now."""
    import timm

    from litv2.models import ALPHA_VARIANTS, HiLoSplitError, checkpoint_filter_fn

    from .builders import build_model

    if cfg.model.name not in timm.list_models(module="litv2"):
        return  # another timm model: its own loader reports what does not fit
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    try:
        checkpoint_filter_fn(state_dict, model)
    except HiLoSplitError as e:
        named = [n for n, a in ALPHA_VARIANTS.items() if a == e.file_alpha]
        also = f" (and model.name={named[0]} for that release of LITv2-S)" if named else ""
        raise UserError(f"{source}: {e}; on the command line: hilo.alpha={e.file_alpha:g}{also}") from None
