"""Download a dataset for train.py into a data folder.

    python get_dataset.py cifar10 --data-dir data

The code lives in `livetrain.playground.get_dataset`.
"""

from livetrain.playground.get_dataset import main

if __name__ == "__main__":
    raise SystemExit(main())
