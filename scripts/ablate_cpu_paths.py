"""What each of LITv2's CPU fast paths (litv2.accel) is worth: the paths switched on one by
one, all timed alternately in one run (round-robin, median).

    python scripts/ablate_cpu_paths.py --model litv2_s --batch-size 16            # fp32 inference
    python scripts/ablate_cpu_paths.py --model litv2_s --batch-size 16 --train    # fwd + bwd + AdamW
    python scripts/ablate_cpu_paths.py --smoke                                    # seconds-long check

Rows (each adds to the one above): plain kernels (``F.linear``, conv then GELU, one
``deform_conv2d`` call); linear layers as oneDNN 1x1 convs and fused dwconv+GELU; DTM's deformable
conv as ``grid_sample`` + a strided conv; its samples by ``embedding_bag`` over the channels-last map
instead; stage blocks in batch chunks; cached oneDNN-blocked weights (= the default). Batch chunks and
blocked weights are inference-only, so in ``--train`` their rows time the same work as the row above them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_cpu_options, apply_cpu_options, create_litv2, inference_fn, machine_description, markdown_table, median_rate,
    restored_process_settings, round_robin, train_step_fn,
)

# (label, settings of litv2.accel.Flags); each row adds one path to the previous one
STEPS = (
    ("plain kernels", dict(onednn=False, dtm_resample=False, dtm_embedding_bag=False, chunk_bytes=0,
                           packed_weights=False)),
    ("+ linear as oneDNN 1x1 conv, fused dwconv+GELU", dict(onednn=True)),
    ("+ DTM as bilinear resampling (grid_sample) + strided conv", dict(dtm_resample=True)),
    ("+ DTM samples by embedding_bag, channels-last", dict(dtm_embedding_bag=True)),
    ("+ stage blocks in batch chunks (inference)", dict(chunk_bytes=None)),
    ("+ cached oneDNN-blocked weights (inference) = default", dict(packed_weights=True)),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="litv2_s")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train", action="store_true", help="time a training step instead of inference")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    add_cpu_options(p)
    p.add_argument("--smoke", action="store_true", help="64x64, batch 2, 1 round")
    p.add_argument("--out-dir", default="outputs/ablate_cpu_paths")
    args = p.parse_args(argv)
    if args.smoke:
        args.img_size, args.batch_size, args.rounds, args.warmup = 64, 2, 1, 0
    if args.batch_size < 1 or args.rounds < 1:
        p.error("--batch-size and --rounds must be >= 1")
    return args


def main(argv=None) -> dict:
    with restored_process_settings():
        return _main(argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    from litv2.accel import Flags

    apply_cpu_options(args)
    torch.manual_seed(0)
    model = create_litv2(args.model).train(args.train)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    step = (train_step_fn if args.train else inference_fn)(model, x)

    default = {k: getattr(Flags, k) for k in STEPS[0][1]}
    settings, current = {}, {}
    for label, change in STEPS:
        current.update({k: default[k] if v is None else v for k, v in change.items()})
        settings[label] = dict(current)

    def variant(flags: dict):
        def run():
            for k, v in flags.items():
                setattr(Flags, k, v)
            step()
        return run

    try:
        times, _ = round_robin({label: variant(f) for label, f in settings.items()}, "cpu", rounds=args.rounds,
                               warmup=args.warmup)
    finally:
        for k, v in default.items():
            setattr(Flags, k, v)
    rates = {label: median_rate(t, args.batch_size) for label, t in times.items()}
    base = rates[STEPS[0][0]]
    rows = [[label, f"{r:.2f}", f"{r / base:.2f}"] for label, r in rates.items()]
    what = "train step (fwd + bwd + AdamW)" if args.train else "inference"
    cmd = "python scripts/ablate_cpu_paths.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"{args.model}, CPU fp32 {what}, batch {args.batch_size}, {args.img_size}px, {args.rounds} round(s), "
          f"median; {machine_description('cpu')}; malloc {args.malloc}\n`{cmd}`\n\n"
          + markdown_table(["CPU path", "img/s", "× plain"], rows))
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablate_cpu_paths.md").write_text(md + "\n")
    payload = {"model": args.model, "batch_size": args.batch_size, "train": args.train, "img_per_s": rates}
    (out / "ablate_cpu_paths.json").write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
