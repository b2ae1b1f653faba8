"""Checkpoints: atomic saves, safe loads, RNG state capture, finding what to resume.

A save writes ``.<name>.tmp-<pid>`` and renames it into place (``os.replace`` is atomic), so a
crash mid-write never damages the previous file; the previous ``last.pth`` is kept as
``last.prev.pth``. A save that fails (full disk, I/O error, read-only file system) removes its temporary
file, leaves the previous checkpoints as they were and raises :class:`CheckpointSaveError`. Loads use
``weights_only=True``; an unreadable or truncated file raises :class:`CheckpointError` saying what the file
is (resume then falls back to ``last.prev.pth``), never a silent load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from litv2.errors import UserError, os_error_words

log = logging.getLogger(__name__)

FORMAT = "litv2-train-v1"
LAST, PREV, BEST = "last.pth", "last.prev.pth", "best.pth"
# Keys that do not change what a run computes: a rerun that differs only here is the same run.
_NOT_IDENTITY = ("trainer.resume", "trainer.dist_timeout_s", "trainer.run_dir_lease_s", "trainer.download_timeout_s",
                 "logger", "profile", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.cache_dir",
                 "data.open_chunks")


class CheckpointError(UserError):
    pass


class CheckpointSaveError(UserError):
    """A checkpoint that could not be written (full disk, I/O error, read-only file system, permissions)."""


# What a run dir holds before any training happened: Hydra's .hydra/, our resolved config and (while a job holds it)
# its lease (litv2.engine.lease).
SETUP_ONLY = {".hydra", "config.yaml", "config_hash", ".lease"}


def remove_if_unused(run_dir) -> bool:
    """Delete a run dir (and its parent, if then empty) that holds nothing but setup files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= SETUP_ONLY:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # runs/<name>/ if nothing else is in it
    except OSError:
        pass
    return True


class _RecordingWriter:
    """A binary file's write / flush as torch.save calls them, remembering the first OSError.

    torch.save reports a failed write of a file object as its writer's follow-up error ("unexpected pos N vs
    M"): the OSError (ENOSPC, EIO, ...) survives only as that error's ``__context__``.
    """

    def __init__(self, f):
        self.f, self.error = f, None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data):
        return self._call(self.f.write, data)

    def flush(self):
        return self._call(self.f.flush)

    def seek(self, *args):
        return self._call(self.f.seek, *args)

    def tell(self):
        return self.f.tell()


def _interrupt_in_chain(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or other non-Exception) that ``e`` was raised while handling, or ``e`` itself."""
    seen = set()
    while e is not None and id(e) not in seen:
        if not isinstance(e, Exception):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


def save_atomic(state: dict, path, keep_previous: str | None = None):
    """Write ``state`` to ``path`` through a temporary file renamed into place; ``keep_previous``: first rename
    an existing ``path`` to this name (in the same directory).

    The previous file is renamed only once the new one is complete and on disk. On a failure to write, flush,
    fsync or rename, the temporary file is removed and :class:`CheckpointSaveError` names the cause; the files
    already there are left as they were (or, had the last rename failed, the previous one is ``keep_previous``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(keep_previous))
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        interrupt = _interrupt_in_chain(e)
        if interrupt is not None and interrupt is not e:  # Ctrl-C mid-write, reported by torch as a writer error
            raise interrupt from None
        cause = e if isinstance(e, OSError) else (writer.error if writer is not None else None)
        if cause is None or not isinstance(e, Exception):  # not the file system (e.g. an unpicklable object)
            raise
        kept = any((path.parent / n).exists() for n in (path.name, keep_previous, PREV, BEST) if n)
        raise CheckpointSaveError(f"{os_error_words(cause)} while writing {path} "
                                  f"({'the previous checkpoints are kept' if kept else 'no checkpoint was saved'})"
                                  ) from cause
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _describe_unreadable(path: Path, error: Exception) -> str:
    """What a file that torch.load(weights_only=True) refused is, in plain words (after "checkpoint <path> ")."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):  # a zip archive (PyTorch's format since 1.6)
        first = head[30:30 + int.from_bytes(head[26:28], "little")].decode("utf-8", "replace")
        kind = "PyTorch zip archive" if first.endswith("/data.pkl") else "zip archive"
        if not zipfile.is_zipfile(path):  # no central directory at its end
            return f"is truncated or damaged: an incomplete {kind} ({size:,} bytes)"
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("/data.pkl") for n in names):
            return f"is a zip archive but not a PyTorch checkpoint (it holds {', '.join(names[:3]) or 'nothing'})"
    elif head.startswith(b"\x80"):  # a pickle: PyTorch's legacy format (or a plain pickle)
        if isinstance(error, pickle.UnpicklingError):
            return _refusal(error)
        return f"is truncated or damaged: a PyTorch file in the legacy (pickle) format ({size:,} bytes)"
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:  # a multi-byte character cut at the end of the sample
            text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else None
        if text is None or any(c < " " and c not in "\t\n\r" for c in text):
            return f"is not a PyTorch checkpoint (unrecognised binary data, {size:,} bytes)"
        first_line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        quote = first_line[:60] + ("..." if len(first_line) > 60 else "")
        html = re.match(r"\s*<(!doctype html|html)\b", text, re.IGNORECASE)
        what = "an HTML page (a download that returned a web page?)" if html else "a text file"
        return f"is not a PyTorch checkpoint but {what}, starting {quote!r}"
    if isinstance(error, pickle.UnpicklingError):
        return _refusal(error)
    detail = _first_sentence(error)
    detail = f" ({detail})" if re.search(r"[A-Za-z]{3}", detail) else ""  # not a bare key or opcode number
    return f"is damaged: a PyTorch zip archive whose contents do not load{detail}"


def _refusal(error: Exception) -> str:
    """A weights_only unpickler error: a refused object (a class not allowed by default) or unreadable pickle data."""
    after = str(error).partition("WeightsUnpickler error:")[2].strip()
    detail = after.splitlines()[0].split(". ")[0].rstrip(".") if after else ""
    if detail.startswith("Unsupported global"):
        return f"holds objects that weights_only loading refuses ({detail})"
    return "is truncated or damaged: its pickled data is unreadable" + (f" ({detail})" if detail else "")


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else ""


def load_file(path) -> dict:
    """torch.load(weights_only=True) with one clear error for missing / unreadable / truncated files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle, ...
        try:
            what = _describe_unreadable(path, e)
        except OSError as read_error:
            what = f"cannot be read ({os_error_words(read_error)})"
        raise CheckpointError(f"checkpoint {path} {what}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (got {type(state).__name__})")
    return state


def load_resume_state(run_dir) -> tuple[dict, Path] | None:
    """The newest readable training checkpoint in run_dir: last.pth, else last.prev.pth."""
    errors = []
    for name in (LAST, PREV):
        p = Path(run_dir) / name
        if not p.exists():
            continue
        try:
            state = load_file(p)
            if state.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint {p} is not a training checkpoint of this framework")
            if errors:
                log.warning("%s; resuming from the previous checkpoint %s instead", errors[-1], p)
            return state, p
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("; ".join(errors))
    return None


def has_checkpoint(run_dir) -> bool:
    return (Path(run_dir) / LAST).exists() or (Path(run_dir) / PREV).exists()


def load_resume_state_on_all_ranks(run_dir, resume_from: str, info) -> tuple[dict, Path]:
    """The training checkpoint to resume from, the same on every rank.

    Rank 0 chooses the file (``resume_from="auto"``: last.pth, else last.prev.pth; or the given path) and sends
    its name; every other rank reads that file. A rank that cannot read it (a node-local ``paths.runs_root``) or
    reads another version of it (a stale directory entry on a network file system) gets rank 0's copy instead,
    so all replicas start from the same weights and step.
    """
    from .distributed import all_gather_object, broadcast_object

    choice, state = None, None
    if info.is_main:
        try:
            if resume_from == "auto":
                state, path = load_resume_state(run_dir)
            else:
                state, path = load_file(resume_from), Path(resume_from)
                if state.get("format") != FORMAT:
                    raise CheckpointError(f"trainer.resume={resume_from} is not a training checkpoint of this framework")
            choice = (str(path), state["progress"])
        except CheckpointError as e:
            choice = e
    choice = broadcast_object(choice, info)
    if isinstance(choice, CheckpointError):
        raise CheckpointError(str(choice))
    path, progress = Path(choice[0]), choice[1]
    if not info.is_main:
        try:
            state = load_file(path)
        except CheckpointError:
            state = None
    agree = state is not None and state.get("progress") == progress
    if not all(all_gather_object(agree, info)):
        sent = broadcast_object(state if info.is_main else None, info)
        if not agree:
            log.warning("rank %d: %s unreadable here or not rank 0's version; using rank 0's copy", info.rank, path)
            state = sent
    return state, path


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_hash(cfg) -> str:
    """Identity of a run's configuration (what it computes), for trainer.resume=auto."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in _NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_unfinished_run(runs_root, cfg_hash: str, exclude=None, lease_ttl_s: float = 120.0) -> Path | None:
    """The run dir under runs_root that a rerun of this config continues: no summary.json, no live job holding it
    (see :mod:`litv2.engine.lease`), and the latest checkpoint of those; else the latest such dir without a
    checkpoint (a run stopped before its first one)."""
    from .lease import is_held

    root = Path(runs_root)
    if not root.is_dir():
        return None
    with_checkpoint, without = [], []
    for f in root.rglob("config_hash"):
        d = f.parent
        if exclude is not None and d.resolve() == Path(exclude).resolve():
            continue
        try:
            if f.read_text().strip() != cfg_hash or (d / "summary.json").exists() or is_held(d, lease_ttl_s):
                continue
            saved = [(d / n).stat().st_mtime for n in (LAST, PREV) if (d / n).exists()]
            (with_checkpoint if saved else without).append((max(saved) if saved else f.stat().st_mtime, str(d)))
        except FileNotFoundError:  # removed while we looked (a failed start cleaning up)
            continue
    found = with_checkpoint or without
    return Path(max(found)[1]) if found else None


# ---- resuming under another config ----------------------------------------------------------------------------

# model.* keys that do not change the architecture: regularisation, weights to start from, how it is computed, and
# the input size (LITv2 has no position embedding; where a model's parameters depend on it, the shape check tells).
_NOT_ARCHITECTURE = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "drop_path_rate", "drop_rate",
                     "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "img_size", "accel", "recompute_gelu",
                     "recompute_dwconv", "kernels"}


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _identity(cfg) -> dict:
    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat = _flat(c)
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in _NOT_IDENTITY)}


def _changes(old: dict, new: dict, keys) -> list[str]:
    return [f"{k} {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in sorted(keys)]


# An ImageFolder tree and its LitData chunks (data/make_shards.py) are one dataset read two ways: a run may move from
# one to the other (a recipe change: resume warns).
_SAME_IMAGES = ({"imagenet", "shards"}, {"folder", "shards"})


def source_change(old: str | None, new: str | None) -> bool:
    """Whether ``data.name`` going from ``old`` to ``new`` reads the same images another way (not another dataset)."""
    return old != new and any({old, new} <= same for same in _SAME_IMAGES)


def check_resumable(cfg, state: dict, source) -> None:
    """Raise CheckpointError if ``state`` (a training checkpoint) was trained on another model or dataset than
    ``cfg`` describes: its config, then its weights' shapes against the configured model (built on the meta
    device)."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"trainer.resume={source} is not a training checkpoint of this framework (to start "
                              f"from its weights: trainer.init_from={source})")
    saved, now = _identity(state.get("config") or {}), _identity(cfg)
    arch = [k for k in set(saved) | set(now) if (k.startswith("model.") and k[6:] not in _NOT_ARCHITECTURE
                                                 or k.startswith("hilo.")) and saved.get(k) != now.get(k)]
    data = [k for k in ("data.name", "data.num_classes") if saved.get(k) != now.get(k)
            and not (k == "data.name" and source_change(saved.get(k), now.get(k)))]
    if arch or data:
        what = "model" if arch else "dataset"
        changed = "; ".join(_changes(saved, now, arch + data)[:4])
        raise CheckpointError(f"trainer.resume={source} was trained on another {what}: {changed} (resume with its "
                              f"settings, or start from its weights with trainer.init_from={source})")
    import torch as _torch

    from .builders import build_model

    with _torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = state.get("model") or {}
    for k, v in weights.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise CheckpointError(f"trainer.resume={source} does not fit the configured model: {k} is "
                                  f"{tuple(v.shape)} in the checkpoint, {expected[k]} in the model")
    odd = sorted(set(expected) ^ set(weights))
    if odd:
        where = "the checkpoint has no" if odd[0] in expected else "the model has no"
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise CheckpointError(f"trainer.resume={source} does not fit the configured model: {where} {odd[0]}{more}")


# Keys that say when to stop, log or save, where things are, or how fast it runs: not the recipe.
_NOT_RECIPE = ("name", "paths", "trainer.max_steps", "trainer.log_every", "trainer.eval_every",
               "trainer.ckpt_every_steps", "trainer.signal_exit_code", "trainer.on_nonfinite", "trainer.device",
               "trainer.compile", "trainer.compile_mode", "trainer.cuda_graphs", "trainer.channels_last", "trainer.tf32",
               "trainer.cpu_keep_freed_memory",
               "model.accel", "model.recompute_gelu", "model.recompute_dwconv", "model.kernels")


def recipe_changes(cfg, state: dict, world_size: int) -> list[str]:
    """What differs in the recipe between the checkpoint's run and this one (another model or dataset was refused by
    check_resumable): ``["optim.lr 0.0005 -> 0.001", "world size 1 -> 2", ...]``."""
    saved, now = _identity(state.get("config") or {}), _identity(cfg)
    keys = [k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
            and not any(k == n or k.startswith(n + ".") for n in _NOT_RECIPE)]
    changed = _changes(saved, now, keys)
    if state.get("world_size") not in (None, world_size):
        changed.append(f"world size {state['world_size']} -> {world_size}")
    return changed
