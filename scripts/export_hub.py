"""Write a checkpoint as a timm / Hugging Face hub folder: model.safetensors, config.json and a model card.

    python scripts/export_hub.py runs/litv2_s_in1k/<date_time>/best.pth hub/litv2_s_ours [--ema]   # ours
    python scripts/export_hub.py litv2_s.pth hub/litv2_s --model litv2_s                            # a release file
    python scripts/export_hub.py https://github.com/ziplab/LITv2/releases/download/v1.1/alpha_0.5.pth \\
        hub/litv2_s_alpha0_5 --model litv2_s_alpha0_5                                             # or its URL

The source is one of our training checkpoints (``format: litv2-train-v1``: model, EMA and run config inside; the
architecture, classes and preprocessing come from the run config) or an authors' release file (``--model`` names
the architecture, ``--model-args`` adds constructor arguments as JSON). The folder holds

* ``model.safetensors``: the state dict, in this implementation's (= the release's) parameter names;
* ``config.json``: ``architecture``, ``model_args`` (the architecture arguments: widths, depths, heads, HiLo
  alpha and window sizes, ...) and ``pretrained_cfg`` (preprocessing, classifier, the source's description),
  written by timm's ``save_for_hf``;
* ``README.md``: the model card (timm's hub front matter, how to load it, the efficiency report of
  :func:`litv2.profiling.efficiency_report` and the machine it was measured on).

timm loads it from the local path (``import litv2`` first, which registers the architectures):
``timm.create_model("local-dir:hub/litv2_s", pretrained=True)``; uploaded as a hub repo (``huggingface-cli upload
<user>/<repo> hub/litv2_s``): ``timm.create_model("hf-hub:<user>/<repo>", pretrained=True)``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import json_kwargs, machine_description  # noqa: E402

CITATION = """@inproceedings{pan2022hilo,
  title     = {Fast Vision Transformers with HiLo Attention},
  author    = {Pan, Zizheng and Cai, Jianfei and Zhuang, Bohan},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}"""
# model.* keys that are not architecture arguments (how to load or train it, not what it is)
_NOT_ARCH = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_rate", "drop_path_rate",
             "attn_drop_rate", "proj_drop_rate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="our training checkpoint, or an authors' release file (path or URL)")
    p.add_argument("out", type=Path, help="the folder to write (created; existing files in it are replaced)")
    p.add_argument("--model", help="timm name of a release file's architecture (e.g. litv2_s, litv2_s_alpha0_5)")
    p.add_argument("--model-args", help="JSON object (or a .json file, optionally with 'constructor_kwargs') of "
                                        "further constructor arguments for a release file")
    p.add_argument("--ema", action="store_true", help="our checkpoints: export the EMA weights")
    p.add_argument("--repo-id", help="hub repo id to name in the card's usage line (default: the local folder)")
    p.add_argument("--device", default="cpu", help="where the efficiency report is measured (cpu, cuda)")
    p.add_argument("--img-size", type=int, help="efficiency report resolution (default: the model's input size)")
    p.add_argument("--batch-size", type=int, default=64, help="efficiency report batch (the paper's 64)")
    p.add_argument("--runs", type=int, help="timed passes (default 30 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=int, help="untimed passes first (default 10 on a GPU, 1 on a CPU)")
    p.add_argument("--no-memory", action="store_true", help="leave train/test memory out of the report")
    return p.parse_args(argv)


def load_source(args):
    """(model name, create_model kwargs, the loaded state, its local path, run config or None)."""
    from litv2 import hub
    from litv2.engine.checkpoint import FORMAT, load_file

    path = Path(args.source)
    if hub.is_url(args.source):
        path = hub.fetch(args.source, hint="download it yourself and pass its path")
        hub.check_loadable(path, args.source)
    state = load_file(path)
    if state.get("format") == FORMAT:
        from omegaconf import OmegaConf

        from litv2.engine.builders import model_kwargs

        run = OmegaConf.create(state["config"])
        kwargs = {**model_kwargs(run.model), "num_classes": int(run.data.num_classes), **json_kwargs(args.model_args, "--model-args")}
        return args.model or run.model.name, kwargs, state, path, run
    if not args.model:
        raise SystemExit(f"{args.source} is not one of our training checkpoints: name its architecture with --model "
                         f"(e.g. --model litv2_s)")
    return args.model, json_kwargs(args.model_args, "--model-args"), state, path, None


def architecture_args(model, kwargs: dict) -> dict:
    """The constructor arguments that rebuild ``model`` (JSON-serialisable); no drop rates, no load options."""
    from litv2.models import LITv2

    out = {k: v for k, v in kwargs.items() if k not in _NOT_ARCH}
    if isinstance(model, LITv2):
        alpha = model.alpha[0] if len(set(model.alpha)) == 1 else list(model.alpha)
        out.update(embed_dim=model.embed_dim, depths=list(model.depths), num_heads=list(model.num_heads_per_stage),
                   mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias, alpha=alpha, local_ws=list(model.local_ws),
                   attention=model.attention, patch_size=model.patch_size)
    out.pop("img_size", None)  # timm records it from the model's own input-size trait
    return out


def data_config(run) -> dict | None:
    """Our checkpoints: the preprocessing of the run (size, crop, interpolation, normalisation)."""
    if run is None:
        return None
    d = run.data
    size = int(d.img_size)
    return {"input_size": (3, size, size), "crop_pct": float(d.crop_pct), "crop_mode": str(d.crop_mode),
            "interpolation": str(d.interpolation), "mean": tuple(d.mean), "std": tuple(d.std)}


def description(name: str, model, state: dict, run, args) -> str:
    if run is None:
        return model.pretrained_cfg.get("description") or f"{name} weights from {args.source}"
    best = (state.get("progress") or {}).get("best") or {}
    top1 = f", best val top-1 {best['top1']:.2f} % (epoch {best['epoch']})" if best.get("top1", -1) >= 0 else ""
    which = "EMA weights" if args.ema else "weights"
    return f"{name} {which} trained with the litv2 framework on {run.data.name} ({run.data.num_classes} classes){top1}"


def efficiency(model, args, img_size: int) -> dict:
    from litv2.profiling import efficiency_report

    on_gpu = torch.device(args.device).type == "cuda"
    runs = args.runs if args.runs is not None else (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    report = efficiency_report(model, img_size=img_size, device=args.device, batch_size=args.batch_size, runs=runs,
                               warmup=warmup, memory=not args.no_memory)
    report.update(runs=runs, warmup=warmup, machine=machine_description(args.device),
                  date=datetime.date.today().isoformat())
    model.to("cpu")
    return report


def model_card(name: str, desc: str, report: dict, out: Path, args, cfg: dict) -> str:
    from timm.models._hub import generate_readme

    source = f"hf-hub:{args.repo_id}" if args.repo_id else f"local-dir:{out}"
    h, w = report["img_size"]
    mem = ""
    if "train_mem_mb" in report:
        mem = f"| train memory (MB, batch {report['batch_size']}) | {report['train_mem_mb']} |\n" \
              f"| test memory (MB, batch {report['batch_size']}) | {report['test_mem_mb']} |\n"
    card = {
        "description": f"LITv2 (HiLo attention) image classifier: {desc}.",
        "details": {
            "Model Type": "Image classification / feature backbone",
            "Architecture": name,
            "Model Stats": {"Params (M)": report["params_m"], "GFLOPs": report["gflops"],
                            "Image size": f"{h} x {w}"},
            "Papers": {"Fast Vision Transformers with HiLo Attention": "https://arxiv.org/abs/2205.13213"},
            "Original": "https://github.com/ziplab/LITv2",
        },
        "usage": ("```python\nimport timm\nimport litv2  # registers the LITv2 architectures with timm\n\n"
                  f"model = timm.create_model({source!r}, pretrained=True).eval()\n"
                  "cfg = timm.data.resolve_data_config({}, model=model)\n"
                  "transform = timm.data.create_transform(**cfg)\n```\n"),
    }
    if cfg.get("license"):
        card["license"] = cfg["license"]
    return (generate_readme(card, out.name) + "\n## Efficiency\n"
            f"`litv2.profiling.efficiency_report` in fp32, batch {report['batch_size']} at {h}x{w}, throughput the mean "
            f"of {report['runs']} timed runs after {report['warmup']} warm-up, measured on {report['machine']} "
            f"({report['device']}) on {report['date']}:\n\n"
            "| | |\n|---|---:|\n"
            f"| params | {report['params']:,} |\n| GFLOPs (multiply-accumulates) | {report['gflops']} |\n"
            f"| throughput (images/s) | {report['throughput']} |\n{mem}"
            f"\n## Citation\n```bibtex\n{CITATION}\n```\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import timm
    from timm.models import save_for_hf

    import litv2  # noqa: F401  (registers the LITv2 architectures)
    from litv2.engine.evaluate import load_weights

    name, kwargs, state, path, run = load_source(args)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_weights(model, path, use_ema=args.ema, strict=True, state=state)
    model.eval()
    desc = description(name, model, state, run, args)
    args.out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, args.out, model_args=architecture_args(model, kwargs), safe_serialization=True,
                data_config=data_config(run), model_config={"pretrained_cfg": {"description": desc}})
    cfg = json.loads((args.out / "config.json").read_text())
    size = args.img_size or cfg["pretrained_cfg"]["input_size"][-1]
    report = efficiency(model, args, size)
    (args.out / "README.md").write_text(model_card(name, desc, report, args.out, args, cfg["pretrained_cfg"]))
    print(f"wrote {args.out}/model.safetensors, config.json, README.md ({name}: {report['params_m']} M params, "
          f"{report['gflops']} GFLOPs, {report['throughput']} img/s on {report['machine']})")
    return {"name": name, "out": str(args.out), "config": cfg, "report": report}


if __name__ == "__main__":
    from litv2.errors import UserError

    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
