#!/usr/bin/env python
"""Convert an ImageFolder tree (train/ and val/) into LitData chunks for `data=shards`.

    python data/make_shards.py --src /datasets/imagenet --dst /datasets/imagenet_shards
    python data/make_shards.py --src ... --dst ... --resize 256 --quality 90   # smaller, pre-resized copies

The JPEG bytes are stored as they are (no re-encoding; --resize re-encodes the larger ones), with the label and
the relative path, in a seeded shuffled order, in chunks of --chunk-mb MB; every image is decoded once and an
unreadable one is listed in manifest.json and left out. manifest.json (per-class counts, per-chunk SHA-256) is
written last: a killed or failed conversion has none, and rerunning the same command finishes it.
Exits 0 when the output is complete, 1 with one line naming the problem otherwise.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litv2.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="ImageFolder root holding train/ and val/")
    ap.add_argument("--dst", required=True, help="output folder (local or shared file system)")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--chunk-mb", type=float, default=64.0, help="chunk file size in MB (default 64)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all CPUs)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the record order")
    ap.add_argument("--resize", type=int, default=None, metavar="SHORT_SIDE",
                    help="store images whose short side is longer resized to this short side (JPEG re-encoded)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of --resize (default 90)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from litv2.data.convert import convert

    try:
        manifest = convert(args.src, args.dst, args.splits, args.chunk_mb, args.workers, args.seed,
                           (args.resize, args.quality) if args.resize else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['records']} records of {s['images']} images in {len(manifest['classes'])} classes, "
              f"{len(s['corrupt'])} unreadable left out")
        for c in s["corrupt"][:20]:
            print(f"  unreadable: {c['path']} ({c['error']})")
    print(f"complete: {Path(args.dst) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
