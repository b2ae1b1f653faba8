"""pytest plugin: run timm's own ``tests/test_models.py`` on the litv2 models only.

Loaded with ``-p litv2_timm_plugin`` by ``tests/timm_suite/run.py`` (which puts this directory on
PYTHONPATH). Not a test module and not a conftest: the main suite (``pytest tests``) never loads it.

What it does, in order:

* at import (before any test module is imported): ``import litv2`` so the models are registered (the base
  models and ``litv2_s_alpha0``; ``LITV2_TIMM_ALL_ALPHAS=1`` adds the other alpha variants), then
  replace ``timm.list_models`` / ``timm.list_pretrained`` with wrappers. timm's test file does
  ``from timm import list_models, list_pretrained`` at import time and builds every
  ``@pytest.mark.parametrize('model_name', list_models(...))`` list from them, so with the wrappers:
  - every list holds only litv2 model names (the normal filters still apply: a test whose filter
    excludes litv2, e.g. ``list_models('efficientnet_[hx]_*')``, gets an empty list);
  - a ``module=`` argument (``FEAT_INTER_FILTERS``) is treated as also containing ``'litv2'``, the
    timm registry module of our models, so the forward_intermediates / prune contract tests run.
* at collection: deselect every item whose ``model_name`` is not a litv2 model (the tests that
  hard-code other timm models, and empty-parameter-set placeholders), and the tests that need the
  network (pretrained downloads) unless ``LITV2_TIMM_NETWORK=1``. Then check that each litv2 model
  got every test in ``REQUIRED`` (so a timm upgrade that renames or refilters a test fails loudly
  instead of silently running less); ``LITV2_TIMM_NO_REQUIRED_CHECK=1`` turns that off.
* registers timm's own markers (from its pyproject.toml); pytest-timeout enforces its
  ``@pytest.mark.timeout`` limits.
"""
from __future__ import annotations

import inspect
import os
from collections import defaultdict

import pytest

import litv2  # noqa: F401  registers litv2_s/m/b/b_384 with timm -- must precede the timm test import
import timm
from timm.models import _registry

LITV2_MODULE = "litv2"  # timm registry module name of our models (last part of litv2.models.litv2)

# tests that download weights / reference tensors (pretrained=True, hf_hub_download)
NETWORK_TESTS = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")

# every litv2 model must be collected by each of these (alternatives in a tuple: exactly which one
# applies depends on timm's NON_STD_FILTERS)
REQUIRED = (
    "test_model_forward",
    "test_model_backward",
    ("test_model_default_cfgs", "test_model_default_cfgs_non_std"),
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_torchscript",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)


def _litv2_names() -> set[str]:
    """Model names registered by the litv2 package (by entrypoint module, not by name pattern)."""
    return {
        name for name, fn in _registry._model_entrypoints.items()
        if getattr(fn, "__module__", "").split(".")[0] == "litv2"
    }


# LITv2-S at the released alphas (litv2_s_alpha*) is litv2_s with another head split. Of those the suite runs
# litv2_s_alpha0, whose HiLo has no Lo-Fi branch, a code path no base model has (alpha 1's missing Hi-Fi branch is
# every stage 4's); the rest share litv2_s's. LITV2_TIMM_ALL_ALPHAS=1 runs all seven (all 11 models: 122 tests,
# 14 min on a 2-core CPU).
ALPHA_VARIANTS_RUN = ("litv2_s_alpha0",)
LITV2_MODELS = {n for n in _litv2_names() if not n.startswith("litv2_s_alpha") or n in ALPHA_VARIANTS_RUN
                or os.environ.get("LITV2_TIMM_ALL_ALPHAS") == "1"}
if not LITV2_MODELS:
    raise RuntimeError("import litv2 registered no models with timm; nothing for the timm suite to run")


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]  # 'litv2_s.in1k' -> 'litv2_s'


_orig_list_models = timm.list_models
_orig_list_pretrained = timm.list_pretrained
_list_models_sig = inspect.signature(_orig_list_models)
_list_pretrained_sig = inspect.signature(_orig_list_pretrained)


def list_models(*args, **kwargs):
    """timm.list_models restricted to litv2; a non-empty ``module=`` also includes 'litv2'."""
    bound = _list_models_sig.bind(*args, **kwargs)
    module = bound.arguments.get("module")
    if module:
        modules = [module] if isinstance(module, str) else list(module)
        if LITV2_MODULE not in modules:
            modules.append(LITV2_MODULE)
        bound.arguments["module"] = modules
    names = _orig_list_models(*bound.args, **bound.kwargs)
    return [n for n in names if _base_name(n) in LITV2_MODELS]


def list_pretrained(*args, **kwargs):
    """timm.list_pretrained restricted to litv2 (same semantics as timm's: pretrained, with tags)."""
    bound = _list_pretrained_sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return list_models(filter=bound.arguments["filter"], pretrained=True,
                       exclude_filters=bound.arguments["exclude_filters"], include_tags=True)


list_models.__wrapped__ = _orig_list_models
list_pretrained.__wrapped__ = _orig_list_pretrained
# Only the top-level names are replaced; timm's internals (create_model, _registry.list_models)
# keep the originals.
timm.list_models = list_models
timm.list_pretrained = list_pretrained


# ---- collection --------------------------------------------------------------------------------

def _model_param(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    value = callspec.params.get("model_name")
    return value if isinstance(value, str) else None


def _func_name(item) -> str:
    return getattr(item, "originalname", None) or item.name.split("[", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before -k / -m, so the REQUIRED check sees the full collection
def pytest_collection_modifyitems(session, config, items):
    network = os.environ.get("LITV2_TIMM_NETWORK") == "1"
    keep, deselected = [], []
    for item in items:
        model = _model_param(item)
        ok = model is not None and _base_name(model) in LITV2_MODELS
        if ok and not network and _func_name(item) in NETWORK_TESTS:
            ok = False
        (keep if ok else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = keep

    if os.environ.get("LITV2_TIMM_NO_REQUIRED_CHECK") == "1" or session.testsfailed:
        return  # (collection errors: let pytest report those rather than a missing-tests message)
    got = defaultdict(set)
    for item in keep:
        got[_base_name(_model_param(item))].add(_func_name(item))
    missing = []
    for model in sorted(LITV2_MODELS):
        for req in REQUIRED:
            alts = req if isinstance(req, tuple) else (req,)
            if not got[model].intersection(alts):
                missing.append(f"{model}: {' or '.join(alts)}")
    if missing:
        raise pytest.UsageError(
            "timm suite collected fewer litv2 tests than required (timm changed its filters or test "
            "names?); missing:\n  " + "\n  ".join(missing))


def pytest_report_header(config):
    return [f"litv2 timm suite: timm {timm.__version__}, models {', '.join(sorted(LITV2_MODELS))}"]


# ---- timm's markers ---------------------------------------------------------------------------------

def _timm_markers(config):
    """The marker lines of timm's own pyproject.toml, next to the tests/ dir of the test file run."""
    import tomllib
    from pathlib import Path

    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        pyproject = (path if path.is_dir() else path.parent).parent / "pyproject.toml"
        if pyproject.is_file():
            with open(pyproject, "rb") as f:
                ini = tomllib.load(f).get("tool", {}).get("pytest", {}).get("ini_options", {})
            return list(ini.get("markers", []))
    return []


def pytest_configure(config):
    # register timm's marks (base, forward, cfg, fxforward, ...) from its own config, not a copy
    for line in _timm_markers(config):
        config.addinivalue_line("markers", line)
