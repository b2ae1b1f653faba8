"""LITv2 and HiLo attention: models, acceleration layer, data, training engine and profiling.

``import litv2`` registers ``litv2_s``, ``litv2_m``, ``litv2_b``, ``litv2_b_384`` and LITv2-S at seven HiLo
alphas (``litv2_s_alpha0`` ... ``litv2_s_alpha1``) with timm, so ``timm.create_model("litv2_s", num_classes=...,
drop_path_rate=...)`` works, and ``pretrained=True`` loads the authors' released weights (:mod:`litv2.hub`);
``litv2.accel.accelerate(model)`` runs such a model on faster kernels (see :mod:`litv2.accel`).
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)
from .models import HiLo, LITv2, checkpoint_filter_fn, load_checkpoint
from . import accel  # noqa: E402  (after the models it swaps)

__version__ = "0.1.0"
