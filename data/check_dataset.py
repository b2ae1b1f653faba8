#!/usr/bin/env python
"""Check an ImageFolder tree before a long job: class count, images per split, unreadable files.

    python data/check_dataset.py data/imagenet --num-classes 1000            # layout + counts (fast)
    python data/check_dataset.py data/imagenet --num-classes 1000 --verify   # also decode every image

Exits 0 when the tree is usable (unreadable files are listed: training skips and counts them),
1 with one line naming the problem otherwise.
"""
import argparse
import json
import sys

from litv2.data import check_image_folder
from litv2.errors import UserError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="dataset root holding train/ and val/")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--num-classes", type=int, default=None, help="expected number of class folders")
    ap.add_argument("--verify", action="store_true", help="decode every image to find unreadable files")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        report = check_image_folder(args.root, args.splits, verify=args.verify, num_classes=args.num_classes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for split, r in report.items():
            bad = f", {len(r['unreadable'])} unreadable" if args.verify else ""
            print(f"{split}: {r['classes']} classes, {r['images']} images{bad}")
            for p in r["unreadable"][:20]:
                print(f"  unreadable: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
