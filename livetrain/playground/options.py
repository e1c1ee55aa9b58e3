"""train.py's command line: the options, their checks, and a resumed run's saved options.

A resumed run takes its options from its config in the database, where any SQL client
may have written them, so they go through the same checks as the command line's.
"""

from __future__ import annotations

import argparse
import math
import threading
from typing import Any

import torch

from livetrain.db.contract import DEFAULTS, DROPOUT_MAX, OPTIMIZERS, validate
from livetrain.db.store import Store, clean_run_name, describe_url
from livetrain.db.writer import SPILL_AFTER_ROWS
from livetrain.playground import sweep
from livetrain.playground.data import DATASETS
from livetrain.playground.models import MODEL_NAMES
from livetrain.playground.schedules import LR_SCHEDULES
from livetrain.playground.user_model import is_user_model, model_spec
from livetrain.trainer.guard import NAN_GUARDS
from livetrain.trainer.ownership import claim_run

DESCRIPTION = "Train a model while a database carries its telemetry out and its parameters in."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=model_spec, default="smallcnn",
                   help=f"one of {', '.join(MODEL_NAMES)}, or your own nn.Module: "
                   "path/to/file.py:ClassName or package.module:factory")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision weights")
    p.add_argument("--transfer", action="store_true", help="pretrained, train only the head")
    p.add_argument(
        "--dataset", default="mnist5k",
        help=f"one of {', '.join(DATASETS)}, or a folder of class sub-folders",
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=50, help="log statistics every N steps")
    p.add_argument("--val-batches", type=int, default=10, help="validation batches per log")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS["optimizer"])
    p.add_argument("--lr", type=float, default=DEFAULTS["learning_rate"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument(
        "--dropout", type=int, default=DEFAULTS["dropout"], help=f"percent, 0..{DROPOUT_MAX}"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: CUDA, else Apple's MPS, else the CPU")
    p.add_argument("--nan-guard", choices=NAN_GUARDS, default="auto",
                   help="how a non-finite update is refused: on the device without a host "
                   "sync (device), or read at every step (exact); see the README")
    p.add_argument("--run-name", type=run_name, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--init", type=init_scheme, default="default",
                   help="weights: default, kaiming, xavier or normal:STD")
    p.add_argument("--no-normalize", action="store_true", help="feed raw [0, 1] pixels")
    p.add_argument("--overfit-batches", type=int, default=0,
                   help="train on only the first N batches (training accuracy should hit 100 %%)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="none")
    p.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                   help="finish after PATIENCE logs without a better validation loss (0 = off)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the gradient L2 norm to this (0 = off); steerable live")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="also checkpointed just before adopting new parameters")
    p.add_argument("--checkpoint-keep", type=int, default=5, help="recent checkpoints kept")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $DATABASE_URL, "
                   "else sqlite:///training.db)")
    p.add_argument("--buffer-rows", type=int, default=SPILL_AFTER_ROWS,
                   help="unwritten rows held in memory while the database is unreachable; "
                   "beyond, they go to a file in the run's checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (for logs)")
    p.add_argument("--sweep", type=sweep.parse_axis, action="append", default=[],
                   metavar="NAME=V1,V2", help="one run per combination of these values of any "
                   "option (repeat for more axes), each its own process")
    p.add_argument("--parallel", type=int, default=1, help="sweep runs at once")
    p.add_argument("--resume", type=int, metavar="RUN_ID", default=None,
                   help="continue this run from its latest checkpoint, with its options")
    p.add_argument("--wait", action="store_true",
                   help="with --resume: while the run's trainer may still live, wait until "
                   "the run counts as lost instead of refusing")
    args = p.parse_args(argv)
    if args.wait and args.resume is None:
        p.error("--wait goes with --resume RUN_ID")

    for error in option_errors(args):
        p.error(error)
    return args


def option_errors(args: argparse.Namespace) -> list[str]:
    """What is wrong with a set of options: the checks argparse's types cannot make.

    Also run on a resumed run's options, which come from its config in the database
    and so may have been written by anyone."""
    errors = []
    for name in ("epochs", "batch_size", "log_every", "val_batches", "checkpoint_every",
                 "checkpoint_keep", "buffer_rows", "parallel"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        errors.append("--max-steps must be at least 1")
    for name in ("workers", "overfit_batches", "early_stopping"):
        if getattr(args, name) < 0:
            errors.append(f"--{name.replace('_', '-')} must be 0 or more")
    _, invalid = validate(args.optimizer, args.lr, args.weight_decay, args.dropout,
                          args.grad_clip)
    errors.extend(invalid.values())
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda: no CUDA device is available")
    if args.device == "mps" and not torch.backends.mps.is_available():
        errors.append("--device mps: no MPS device is available (Apple silicon, macOS 12.3+)")
    return errors


def run_name(value: str) -> str:
    """argparse type for --run-name: the rule the board and the Store apply."""
    try:
        return clean_run_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def init_scheme(value: str) -> str:
    """argparse type for --init."""
    if value in ("default", "kaiming", "xavier"):
        return value
    if value.startswith("normal:"):
        try:
            std = float(value.split(":", 1)[1])
        except ValueError:
            std = -1.0
        if std > 0 and math.isfinite(std):
            return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: use default, kaiming, xavier or normal:STD with STD > 0"
    )


# Options a resumed run may change; everything else comes from the run's own config.
RESUMABLE_OVERRIDES = ("db", "resume", "no_progress", "epochs", "max_steps", "device",
                       "workers", "checkpoint_dir")


def resume_options(args: argparse.Namespace, store: Store,
                   stop: threading.Event) -> argparse.Namespace:
    """The resumed run's options, with the overrides given on this command line;
    LookupError when there is nothing to resume or its trainer may still live."""
    run = store.get_run(args.resume)
    if run is None:
        raise LookupError(f"there is no run {args.resume} in {describe_url(store.url)}")
    if store.latest_checkpoint(args.resume) is None:
        raise LookupError(f"run {args.resume} has no checkpoint to resume from")
    if store.get_parameters(args.resume) is None:
        raise LookupError(f"run {args.resume} has no parameters row to steer it with")
    claim_run(store, run, stop, wait=args.wait)
    defaults = vars(parse_args([]))
    given = {k: v for k, v in vars(args).items() if k in RESUMABLE_OVERRIDES
             and v != defaults.get(k)}
    config = run["config"] if isinstance(run["config"], dict) else {}
    try:
        saved = saved_options(config, defaults, given_model=args.model)
    except ValueError as exc:
        raise LookupError(f"run {args.resume} cannot be resumed: {exc}") from None
    options = argparse.Namespace(**(defaults | saved | given))
    if errors := option_errors(options):
        raise LookupError(f"run {args.resume}'s saved options cannot be used: "
                          f"{'; '.join(errors)}")
    return options


# Not taken from a saved config: they say how this command reaches the run, not the run.
NOT_SAVED = ("db", "resume", "wait", "sweep", "parallel")
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda", "mps"), "nan_guard": NAN_GUARDS,
    "lr_schedule": LR_SCHEDULES,
}


def saved_options(config: dict[str, Any], defaults: dict[str, Any],
                  given_model: str | None = None) -> dict[str, Any]:
    """The options a run's config holds, checked for type and choice: the config comes
    from the database, where any SQL client may have written it. ValueError names
    what is wrong. A run of the user's own model (--model FILE.py:NAME) resumes only
    when this command line names the same model: a module path read from the database
    is never imported."""
    saved, wrong = {}, []
    for name, value in config.items():
        if name not in defaults or name in NOT_SAVED:
            continue
        default = defaults[name]
        kind = type(default) if default is not None else (
            int if name == "max_steps" else str)
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if default is None and value is None:
            ok = True
        if ok and name in CHOICES:
            ok = value in CHOICES[name]
        if ok and name == "init":
            try:
                init_scheme(value)
            except argparse.ArgumentTypeError:
                ok = False
        if ok and name == "model" and is_user_model(value):
            ok = value == given_model  # its code is never loaded on the database's word
        if ok:
            saved[name] = value
        else:
            wrong.append(f"{name}={str(value)[:40]!r}")
    if wrong:
        raise ValueError(f"its saved options are not valid: {', '.join(wrong)}")
    return saved
