#!/usr/bin/env python
"""Spectrum of the Hi-Fi and Lo-Fi outputs of one HiLo block (paper Fig. 5, supplementary Algorithm 1).

Forward hooks on the block's ``attn.h_proj`` (Hi-Fi) and ``attn.l_proj`` (Lo-Fi) collect their channels-last
``(B, H, W, C)`` outputs for N images; for every channel the log-magnitude of the centred 2-D FFT is
averaged over the images (Algorithm 1) and 8 channels per branch are drawn in two rows (Hi-Fi, Lo-Fi).
The claim "Hi-Fi carries more high frequency" is also printed as a number: the fraction of spectral
energy (``|FFT|^2`` summed over images and channels) outside the central low-frequency disc of radius
``--low-band`` cycles/pixel (0.5 = Nyquist), with the DC term counted (``high_freq_fraction``) and with
each map's mean removed first (``high_freq_fraction_ac``).

Examples::

    python scripts/visualize_freq.py --model litv2_s --checkpoint litv2_s.pth --data-dir imagenet/val -n 100
    python scripts/visualize_freq.py --checkpoint runs/quickstart/<date_time>/best.pth --digits --block 1
    python scripts/visualize_freq.py --model litv2_s --model-kwargs tests/fixtures/tiny_a05_ws2.json \
        --checkpoint tests/fixtures/tiny_a05_ws2.pth --digits -n 20
    python scripts/visualize_freq.py --model litv2_s              # random weights, noise images
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import json_kwargs  # noqa: E402

BRANCHES = (("Hi-Fi", "h_proj"), ("Lo-Fi", "l_proj"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="timm model name (a LITv2 variant); default: the checkpoint's run config, else litv2_s")
    p.add_argument("--model-kwargs", default=None,
                   help="JSON object of constructor kwargs, or a JSON file (its 'constructor_kwargs' if present)")
    p.add_argument("--checkpoint", default=None,
                   help="weights loaded with litv2.models.load_checkpoint; a checkpoint of train.py brings its "
                        "run dir's config.yaml (model name and kwargs, input size, normalisation) unless given")
    p.add_argument("--stage", type=int, default=2, help="0-based stage of the HiLo block (default 2 = stage 3)")
    p.add_argument("--block", type=int, default=0, help="block index inside the stage")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", default=None, help="ImageFolder directory (class sub-folders of images)")
    src.add_argument("--digits", action="store_true", help="scikit-learn's bundled handwritten digits")
    p.add_argument("-n", "--num-images", type=int, default=100, help="images averaged over (paper: 100)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's pretrained_cfg)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels", default=None, help="comma list of channel indices per branch (default 0..7)")
    p.add_argument("--num-channels", type=int, default=8)
    p.add_argument("--low-band", type=float, default=0.25,
                   help="radius (cycles/pixel, Nyquist = 0.5) of the central low-frequency disc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default outputs/freq/<model>_stage<i>_block<j>.png)")
    p.add_argument("--json", default=None, help="also write the energy fractions (and settings) here")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1 or args.num_channels < 1:
        p.error("--num-images, --batch-size and --num-channels must be >= 1")
    if not 0.0 < args.low_band < 0.5 * math.sqrt(2):
        p.error("--low-band must be in (0, 0.707)")
    return args


def run_config(args) -> dict:
    """The resolved config train.py saved next to the checkpoint (``config.yaml``), or {}."""
    if not args.checkpoint:
        return {}
    path = Path(args.checkpoint).resolve().parent / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else {}


def apply_run_config(args) -> None:
    """Fill --model / --model-kwargs / --img-size and the normalisation from the checkpoint's run config."""
    cfg = run_config(args)
    args.norm = None
    if cfg and args.model in (None, cfg["model"].get("name")) and args.model_kwargs is None:
        from litv2.engine.builders import ACCEL_KEYS

        model_cfg = dict(cfg["model"])
        args.model = model_cfg.pop("name")
        for key in ("pretrained", *ACCEL_KEYS):  # not constructor arguments (the checkpoint holds the weights)
            model_cfg.pop(key, None)
        data = cfg.get("data") or {}
        if data.get("num_classes") is not None:  # as litv2.engine.builders.build_model does
            model_cfg.setdefault("num_classes", data["num_classes"])
        args.model_kwargs = json.dumps(model_cfg)
        args.img_size = args.img_size or data.get("img_size")
        if data.get("mean") and data.get("std"):
            args.norm = (list(data["mean"]), list(data["std"]))
    args.model = args.model or "litv2_s"


def build_model(args) -> nn.Module:
    import timm

    import litv2  # noqa: F401  (registers the LITv2 models with timm)
    from litv2.models import load_checkpoint

    model = timm.create_model(args.model, pretrained=False, **json_kwargs(args.model_kwargs, "--model-kwargs"))
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, strict=True)
    return model.eval()


def find_block_attn(model: nn.Module, stage: int, block: int) -> nn.Module:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise SystemExit(f"{type(model).__name__} has no .layers stages (a LITv2 model is expected)")
    if not 0 <= stage < len(layers):
        raise SystemExit(f"--stage {stage} out of range: the model has {len(layers)} stages (0-based)")
    blocks = layers[stage].blocks
    if not 0 <= block < len(blocks):
        raise SystemExit(f"--block {block} out of range: stage {stage} has {len(blocks)} blocks")
    attn = getattr(blocks[block], "attn", None)
    missing = [name for _, name in BRANCHES if getattr(attn, name, None) is None]
    if attn is None or missing:
        what = "no attention" if attn is None else f"{type(attn).__name__} ({attn.extra_repr()})"
        raise SystemExit(f"layers.{stage}.blocks.{block} has {what}, not both HiLo branches (missing "
                         f"{', '.join(missing) if attn is not None else 'attn'}); pick a HiLo stage with "
                         f"0 < alpha < 1 and window size > 1, e.g. --stage 2")
    return attn


def image_batches(args, model: nn.Module):
    """Yield normalised (B, 3, S, S) batches, N images in total, from the chosen source."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = args.img_size or json_kwargs(args.model_kwargs, "--model-kwargs").get("img_size") or cfg["input_size"][-1]
    if not isinstance(size, int):
        size = int(size[-1])
    n, bs = args.num_images, args.batch_size
    if args.data_dir:
        from torchvision.datasets import ImageFolder
        cfg.update(input_size=(3, size, size))
        if getattr(args, "norm", None):
            cfg.update(mean=tuple(args.norm[0]), std=tuple(args.norm[1]))
        dataset = ImageFolder(args.data_dir, transform=timm.data.create_transform(**cfg, is_training=False))
        if len(dataset) == 0:
            raise SystemExit(f"no images under {args.data_dir}")
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
        for i in range(0, len(idx), bs):
            yield torch.stack([dataset[j][0] for j in idx[i:i + bs]])
    elif args.digits:
        from sklearn.datasets import load_digits
        images = torch.from_numpy(load_digits().images[:n]).float() / 16.0  # (n, 8, 8) in [0, 1]
        images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="bicubic",
                                                 align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
        mean_, std_ = getattr(args, "norm", None) or (cfg["mean"], cfg["std"])
        mean = torch.tensor(mean_).view(1, 3, 1, 1)
        std = torch.tensor(std_).view(1, 3, 1, 1)
        images = (images - mean) / std
        yield from images.split(bs)
    else:
        g = torch.Generator().manual_seed(args.seed)
        for i in range(0, n, bs):
            yield torch.randn(min(bs, n - i), 3, size, size, generator=g)


class SpectrumAccumulator:
    """Running sums for Algorithm 1 (mean log-magnitude of the centred FFT) and the energy fractions."""

    def __init__(self, low_band: float):
        self.low_band = low_band
        self.log_mag_sum = None
        self.count = 0
        self.energy = torch.zeros(2, dtype=torch.float64)     # (total, outside low band)
        self.energy_ac = torch.zeros(2, dtype=torch.float64)  # same with each map's mean removed

    def _outside_mask(self, h: int, w: int) -> torch.Tensor:
        fy = torch.fft.fftshift(torch.fft.fftfreq(h))[:, None]
        fx = torch.fft.fftshift(torch.fft.fftfreq(w))[None, :]
        return (fy ** 2 + fx ** 2).sqrt() > self.low_band

    def update(self, out: torch.Tensor) -> None:
        x = out.detach().float().permute(0, 3, 1, 2)  # (B, C, H, W), as Algorithm 1 expects
        spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        mag = spec.abs()
        log_mag = torch.log(mag.clamp_min(1e-12)).sum(0)
        self.log_mag_sum = log_mag if self.log_mag_sum is None else self.log_mag_sum + log_mag
        self.count += x.shape[0]
        outside = self._outside_mask(*x.shape[-2:])
        power = mag.double() ** 2
        self.energy += torch.stack([power.sum(), power[..., outside].sum()])
        spec_ac = torch.fft.fftshift(torch.fft.fft2(x - x.mean((-2, -1), keepdim=True)), dim=(-2, -1))
        power_ac = spec_ac.abs().double() ** 2
        self.energy_ac += torch.stack([power_ac.sum(), power_ac[..., outside].sum()])

    @property
    def mean_log_magnitude(self) -> torch.Tensor:
        return self.log_mag_sum / self.count

    @staticmethod
    def _fraction(e: torch.Tensor) -> float:
        return float(e[1] / e[0]) if e[0] > 0 else 0.0

    def fractions(self) -> dict:
        return {"high_freq_fraction": self._fraction(self.energy),
                "high_freq_fraction_ac": self._fraction(self.energy_ac)}


@torch.inference_mode()
def collect_spectra(model: nn.Module, attn: nn.Module, batches, low_band: float) -> dict[str, SpectrumAccumulator]:
    accs = {label: SpectrumAccumulator(low_band) for label, _ in BRANCHES}
    handles = [getattr(attn, name).register_forward_hook(lambda mod, inp, out, acc=accs[label]: acc.update(out))
               for label, name in BRANCHES]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    if any(acc.count == 0 for acc in accs.values()):
        raise SystemExit("the hooked block never ran (no images?)")
    return accs


def plot_spectra(accs: dict[str, SpectrumAccumulator], channels: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = len(channels)
    fig, axes = plt.subplots(len(accs), ncol, figsize=(2 * ncol, 2.2 * len(accs)), squeeze=False)
    for r, (label, acc) in enumerate(accs.items()):
        img = acc.mean_log_magnitude
        frac = acc.fractions()["high_freq_fraction"]
        for c, ch in enumerate(channels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if ch < img.shape[0]:
                ax.imshow(img[ch].numpy())
                ax.set_title(f"ch {ch}", fontsize=8)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(f"{label}\nhigh-freq {frac:.2f}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    apply_run_config(args)
    model = build_model(args)
    attn = find_block_attn(model, args.stage, args.block)
    accs = collect_spectra(model, attn, image_batches(args, model), args.low_band)
    channels = ([int(c) for c in args.channels.split(",")] if args.channels
                else list(range(args.num_channels)))
    source = args.data_dir or ("digits" if args.digits else "random noise")
    n = accs["Hi-Fi"].count
    map_hw = tuple(accs["Hi-Fi"].mean_log_magnitude.shape[-2:])
    out = Path(args.out or f"outputs/freq/{args.model}_stage{args.stage}_block{args.block}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{args.model} layers.{args.stage}.blocks.{args.block}: log|FFT| ({map_hw[0]}x{map_hw[1]}) averaged over "
             f"{n} images ({source}){'' if args.checkpoint else ', random weights'}")
    plot_spectra(accs, channels, out, title)
    result = {
        "model": args.model, "checkpoint": args.checkpoint, "stage": args.stage, "block": args.block,
        "num_images": n, "source": source, "map_size": list(map_hw), "low_band": args.low_band, "png": str(out),
        "branches": {label: {"channels": int(acc.mean_log_magnitude.shape[0]), **acc.fractions()}
                     for label, acc in accs.items()},
    }
    print(f"{title}\nfraction of spectral energy outside the low-frequency disc (radius {args.low_band} cycles/px):")
    for label, r in result["branches"].items():
        print(f"  {label:6s} {r['high_freq_fraction']:.4f}   (map means removed: {r['high_freq_fraction_ac']:.4f}), "
              f"{r['channels']} channels")
    print(f"wrote {out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
