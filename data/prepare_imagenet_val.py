#!/usr/bin/env python
"""Sort the flat ILSVRC2012 validation folder (ILSVRC2012_val_00000001.JPEG, ...) into class folders.

From the official devkit (ILSVRC2012_devkit_t12.tar.gz, extracted):
    python data/prepare_imagenet_val.py data/imagenet/val --devkit ILSVRC2012_devkit_t12
which reads data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per image, in file order)
and data/meta.mat (ILSVRC2012_ID -> WordNet id such as n01440764).
Or from a mapping file with one "<file name> <wnid>" pair per line (or Kaggle's LOC_val_solution.csv):
    python data/prepare_imagenet_val.py data/imagenet/val --labels val_labels.txt
Files are moved (use --copy to copy); running it again on a sorted folder does nothing.
"""
import argparse
import csv
import shutil
import sys
from pathlib import Path


def labels_from_devkit(devkit: Path, files: list) -> dict:
    from scipy.io import loadmat

    meta = loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta}
    gt = [int(x) for x in (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    if len(gt) != len(files):
        raise SystemExit(f"error: the ground truth lists {len(gt)} images but the folder has {len(files)}")
    return {f: id_to_wnid[i] for f, i in zip(sorted(files), gt)}


def labels_from_file(path: Path) -> dict:
    out = {}
    if path.suffix == ".csv":  # Kaggle: ImageId,PredictionString ("n01751748 x y x y ...")
        with open(path) as f:
            for row in csv.DictReader(f):
                out[row["ImageId"] + ".JPEG"] = row["PredictionString"].split()[0]
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            name, wnid = line.split()[:2]
            out[Path(name).name] = wnid
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val_dir", type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--devkit", type=Path, help="extracted ILSVRC2012_devkit_t12 folder")
    src.add_argument("--labels", type=Path, help="'<file> <wnid>' lines, or LOC_val_solution.csv")
    ap.add_argument("--copy", action="store_true", help="copy instead of move")
    args = ap.parse_args(argv)
    if not args.val_dir.is_dir():
        print(f"error: {args.val_dir} is not a folder", file=sys.stderr)
        return 1
    files = sorted(p.name for p in args.val_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        print(f"{args.val_dir}: no loose images (already sorted?)")
        return 0
    labels = labels_from_devkit(args.devkit, files) if args.devkit else labels_from_file(args.labels)
    missing = [f for f in files if f not in labels]
    if missing:
        print(f"error: no label for {len(missing)} file(s), e.g. {missing[0]}", file=sys.stderr)
        return 1
    op = shutil.copy2 if args.copy else shutil.move
    for f in files:
        d = args.val_dir / labels[f]
        d.mkdir(exist_ok=True)
        op(str(args.val_dir / f), str(d / f))
    print(f"{args.val_dir}: sorted {len(files)} images into {len(set(labels[f] for f in files))} class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
