"""Train a CNN while a database carries its telemetry out and its parameters in.

    python train.py                       # small CNN on the offline MNIST sample, SQLite
    python train.py --db postgresql://postgres@127.0.0.1/postgres --lr 1e-3
    torchrun --nproc_per_node=2 train.py --db postgresql://...   # one run, two processes

The board (or any SQL client) changes optimizer / learning rate / weight decay /
dropout or sets stop_train in the `parameters` row; a background listener hands
the new version to this loop, which applies it at the next step boundary.
Nothing in the loop waits on the database: writes go through a background writer.
Under torchrun, rank 0 alone talks to the database and every rank applies a
change at the same step (see distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import torch
from sqlalchemy.exc import SQLAlchemyError
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from livetrain.db.contract import (
    DEFAULTS,
    DROPOUT_MAX,
    LIVE_STATUSES,
    LOST_AFTER_SECONDS,
    OPTIMIZERS,
    Hyperparameters,
    effective_status,
    heartbeat_age,
    validate,
)
from livetrain.db.listener import ParameterListener
from livetrain.db.store import (
    ParameterState,
    Store,
    UnusableDatabaseError,
    clean_run_name,
    describe_url,
    now,
    open_store,
    resolve_url,
)
from livetrain.db.writer import SPILL_AFTER_ROWS, BackgroundWriter, NullWriter
from livetrain.playground import sweep
from livetrain.playground.data import DATASETS, DatasetUnavailable, load_datasets, make_loaders
from livetrain.playground.models import (
    MODEL_NAMES,
    ModelUnavailable,
    build_model,
    initialize,
    set_dropout,
)
from livetrain.trainer.allocator import keep_freed_memory
from livetrain.trainer.checkpointing import (
    Checkpoint,
    CheckpointRefusedError,
    CheckpointRing,
    Restorable,
    read_checkpoint,
    restorable,
)
from livetrain.trainer.diagnostics import Diagnostician, LayerRecord, StepRecord
from livetrain.trainer.distributed import Ranks
from livetrain.trainer.steering import (
    LR_SCHEDULES,
    apply_parameters,
    build_optimizer,
    learning_rate_in_force,
    schedule_factor,
    trainable,
)
from livetrain.trainer.telemetry import (
    IntervalMetrics,
    LayerProbe,
    Progress,
    SystemSampler,
    evaluate,
    model_table,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="smallcnn")
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
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


class StopSignal:
    """First Ctrl-C (or SIGTERM) asks for a graceful stop; a second one interrupts.

    A signal within a second of the first is the same request: under torchrun a
    Ctrl-C reaches each rank twice, from the terminal and forwarded by torchrun.
    """

    SAME_REQUEST_SECONDS = 1.0

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._first = 0.0
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            if time.monotonic() - self._first < self.SAME_REQUEST_SECONDS:
                return
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.requested.set()
        print("\nstopping after this step (Ctrl-C again to interrupt)", file=sys.stderr)


def say(line: str) -> None:
    """A line on stderr in one write: torchrun's ranks share the terminal (or log), and
    print() writes the text and its newline separately, so lines could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _float(value: float | None) -> float:
    return float("nan") if value is None else value


def describe(p: Hyperparameters) -> str:
    return f"{p.optimizer}, lr {p.learning_rate:g}, weight decay {p.weight_decay:g}, " \
        f"dropout {p.dropout} %"


def describe_change(old: Hyperparameters, new: Hyperparameters) -> str:
    changes = new.changes_from(old)
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "no value changed"


def rejection(version: int, errors: dict[str, str], in_force: Hyperparameters,
              stopping: bool, paused: bool) -> str:
    """The `parameters_rejected` message: each bad column with its value, and what runs."""
    then = "stopping as requested" if stopping else "paused" if paused else "training continues"
    return f"version {version}: rejected {'; '.join(errors.values())}; {then} with " \
        f"{describe(in_force)}"


def adopted(new: Hyperparameters | None, old: Hyperparameters, restored: int | None,
            flags_before: tuple[bool, bool], flags_after: tuple[bool, bool]) -> bool:
    """Whether a partly rejected version changed anything in force, and so is acknowledged."""
    return (new is not None and new != old) or restored is not None \
        or flags_after != flags_before or any(flags_after)


# Options a resumed run may change; everything else comes from the run's own config.
RESUMABLE_OVERRIDES = ("db", "resume", "no_progress", "epochs", "max_steps", "device",
                       "workers", "checkpoint_dir")


MAX_PID = 2**31 - 1  # anything larger read from the database is not a pid
SAME_PROCESS_SECONDS = 1.0  # start times this close: the same process, not a reused pid
WAIT_POLL_SECONDS = 1.0


def trainer_identity() -> dict[str, Any]:
    """What tells this trainer apart from any other, recorded in the run's config: the
    host, the pid and the pid's start time (a pid is reused once its process is gone)."""
    return {"host": platform.node(), "pid": os.getpid(),
            "pid_started": psutil.Process().create_time()}


def trainer_gone(config: Any) -> bool:
    """True when the run's recorded trainer ran on this host and plainly is no more: its
    pid is not alive, is a zombie, or now belongs to a process started at another time.

    The config comes from the database, so any value may be missing or of any type;
    whatever cannot prove the trainer dead counts as "it may live" (False)."""
    if not isinstance(config, dict) or config.get("host") != platform.node():
        return False
    pid, started = config.get("pid"), config.get("pid_started")
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        created = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: it may be the trainer
        return False
    if type(started) not in (int, float) or not math.isfinite(started):
        return False  # a run recorded before start times were: cannot tell a reused pid
    return abs(created - started) > SAME_PROCESS_SECONDS


def describe_trainer(run: dict[str, Any], moment: datetime) -> str:
    """"its trainer (pid 123 on host) sent a heartbeat 2 s ago", from untrusted values."""
    config = run["config"] if isinstance(run["config"], dict) else {}
    return (f"its trainer (pid {str(config.get('pid'))[:20]} on {str(config.get('host'))[:80]}) "
            f"sent a heartbeat {heartbeat_age(run, moment):.0f} s ago")


def wait_until_lost(store: Store, run_id: int, stop: threading.Event) -> None:
    """Return once the run no longer counts as live (or its trainer is plainly gone).

    LookupError when the run disappears or Ctrl-C ends the wait; nothing is changed."""
    said = False
    while True:
        run, moment = store.get_run(run_id), now()
        if run is None:
            raise LookupError(f"run {run_id} was deleted while waiting for it")
        if effective_status(run, moment) not in LIVE_STATUSES or trainer_gone(run["config"]):
            return
        if not said:
            say(f"waiting for run {run_id} to count as lost: {describe_trainer(run, moment)}; "
                f"a run counts as lost after {LOST_AFTER_SECONDS:.0f} s without one "
                "(Ctrl-C to give up)")
            said = True
        if stop.wait(WAIT_POLL_SECONDS):
            raise LookupError(f"stopped waiting for run {run_id}; it is left as it was")


def claim_run(args: argparse.Namespace, store: Store, run: dict[str, Any],
              stop: threading.Event) -> None:
    """Make sure no other trainer still drives the run, then record this one as its trainer.

    A live run may be resumed at once when its trainer ran on this host and is gone (a
    crash, kill -9); otherwise only once its heartbeat is old enough for it to count as
    lost: refused now, or awaited with --wait."""
    moment = now()
    if (status := effective_status(run, moment)) in LIVE_STATUSES:  # two trainers, one run
        if trainer_gone(run["config"]):
            say(f"run {args.resume} is {status} but its trainer on this host is gone: "
                "resuming at once")
        elif args.wait:
            wait_until_lost(store, args.resume, stop)
        else:
            age = heartbeat_age(run, moment)
            raise LookupError(
                f"run {args.resume} is {status}: {describe_trainer(run, moment)}. Stop it "
                f"first; if it is dead, it counts as lost {LOST_AFTER_SECONDS - age:.0f} s "
                "from now (add --wait to resume then)")
    store.record_trainer(args.resume, trainer_identity())


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
    claim_run(args, store, run, stop)
    defaults = vars(parse_args([]))
    given = {k: v for k, v in vars(args).items() if k in RESUMABLE_OVERRIDES
             and v != defaults.get(k)}
    config = run["config"] if isinstance(run["config"], dict) else {}
    try:
        saved = saved_options(config, defaults)
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
    "model": MODEL_NAMES, "device": ("auto", "cpu", "cuda"), "lr_schedule": LR_SCHEDULES,
}


def saved_options(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The options a run's config holds, checked for type and choice: the config comes
    from the database, where any SQL client may have written it. ValueError names
    what is wrong."""
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
        if ok:
            saved[name] = value
        else:
            wrong.append(f"{name}={str(value)[:40]!r}")
    if wrong:
        raise ValueError(f"its saved options are not valid: {', '.join(wrong)}")
    return saved


def read_restorable(
    ranks: Ranks, directory: Path, found: Checkpoint, run_id: int, model: nn.Module
) -> Restorable | str:
    """Rank 0 reads the checkpoint file and every rank checks it against its own model:
    the checked state, or why it was refused (the same answer on every rank)."""
    state: dict[str, Any] | str | None = None
    if ranks.is_main:
        try:
            state = read_checkpoint(directory, found, run_id)
        except CheckpointRefusedError as exc:
            state = str(exc)
    state = ranks.from_main(state)
    if isinstance(state, str):
        return state
    try:
        return restorable(state, model, found)
    except CheckpointRefusedError as exc:
        return str(exc)


def resume_checkpoint(
    ranks: Ranks, store: Store | None, args: argparse.Namespace, model: nn.Module
) -> tuple[Checkpoint, Restorable] | str:
    """The checked checkpoint a resume starts from, or why there is none. Read and
    checked before the run is touched, so that a refusal leaves the run as it was."""
    found: Checkpoint | str | None = None
    if ranks.is_main:
        row = store.latest_checkpoint(args.resume)
        try:
            if row is None:
                raise CheckpointRefusedError(f"run {args.resume} has no checkpoint")
            found = CheckpointRing.from_row(row)
        except CheckpointRefusedError as exc:
            found = str(exc)
    found = ranks.from_main(found)
    if isinstance(found, str):
        return found
    run_dir = Path(args.checkpoint_dir) / f"run_{args.resume}"
    loaded = read_restorable(ranks, run_dir, found, args.resume, model)
    return loaded if isinstance(loaded, str) else (found, loaded)


def refuse_resume(ranks: Ranks, store: Store | None, run_id: int, why: str) -> int:
    """A resume whose checkpoint was refused: one line, an event, the run's status
    untouched; the exit code."""
    if ranks.is_main:
        with contextlib.suppress(SQLAlchemyError):  # if the database is gone too, the
            store.add_event(run_id, "error", "resume_refused",  # line below still says why
                            f"cannot resume: {why}; the run is left as it was")
        store.close()
    print(f"error: cannot resume run {run_id}: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stop = StopSignal()  # first thing: a Ctrl-C during setup still ends the run cleanly
    keep_freed_memory()  # before the first tensor: no page-fault storm at every step
    ranks = Ranks()
    if ranks.distributed and args.sweep:
        print("error: --sweep starts processes of its own; run it without torchrun",
              file=sys.stderr)
        return 2
    if args.sweep:
        base = sweep.without_sweep(argv)
        combos = sweep.combinations(args.sweep)
        for combo in combos:
            parse_args([*base, *combo])  # a bad value exits 2 here, before any run exists
        try:  # and a bad --db ends here, not in every child
            open_store(args.db).close()
        except UnusableDatabaseError as exc:
            say(f"error: {exc}")
            return 1
        return sweep.run(base, combos, args.parallel, args.run_name, stop.requested)
    device = ranks.device(args.device)
    ranks.start(device)  # under torchrun, before the first collective
    # Rank 0 opens the database before the dataset loads, so a bad --db fails in seconds,
    # and reads a resumed run's options; every rank builds from what it found.
    store: Store | None = None
    found: argparse.Namespace | str | None = None  # the options to resume with, or an error
    if ranks.is_main:
        try:
            store = open_store(args.db)
            if args.resume is not None:
                found = resume_options(args, store, stop.requested)
        except (UnusableDatabaseError, LookupError) as exc:
            found = str(exc)
    found = ranks.from_main(found)
    if isinstance(found, str):
        say(f"error: {found}")
        if store is not None:
            store.close()
        return 130 if stop.requested.is_set() else 1
    if found is not None:
        if ranks.distributed:
            found.device = args.device  # the process group already runs on this one
        args = found
        device = ranks.device(args.device)
    torch.manual_seed(args.seed)
    params = Hyperparameters(
        args.optimizer, args.lr, args.weight_decay, args.dropout, args.grad_clip
    )

    try:
        train_set, val_set, info = load_datasets(
            args.dataset, args.data_dir, seed=args.seed, normalize=not args.no_normalize
        )
        model = build_model(
            args.model, info.num_classes, info.in_channels, info.image_size,
            dropout=args.dropout / 100, pretrained=args.pretrained, transfer=args.transfer,
        )
        initialize(model, args.init)
        model.to(device)
    except (DatasetUnavailable, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.overfit_batches:  # seed 003: first make sure the model can learn a little
        train_set = Subset(train_set, range(min(len(train_set),
                                                args.overfit_batches * args.batch_size)))
    train_loader, val_loader = make_loaders(
        train_set, val_set, args.batch_size, args.workers, args.seed,
        shard=(ranks.rank, ranks.world_size) if ranks.distributed else None,
    )
    net = ranks.wrap(model, device)  # trains; `model` itself is inspected and saved
    optimizer = build_optimizer(args.optimizer, trainable(model), args.lr, args.weight_decay)
    probe = LayerProbe(model)
    metrics = IntervalMetrics(device)
    progress = Progress()
    resumed = None
    if args.resume is not None:  # checked first: a refused file leaves the run as it was
        resumed = resume_checkpoint(ranks, store, args, model)
        if isinstance(resumed, str):
            return refuse_resume(ranks, store, args.resume, resumed)

    url = resolve_url(args.db)
    run_id, run_name, seen_version, handled_rollback = None, None, 1, 0
    if ranks.is_main:  # under torchrun, rank 0 alone owns the run in the database
        config = vars(args) | {
            "db": describe_url(url),
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "in_channels": info.in_channels,
            "image_size": info.image_size,
            "train_samples": len(train_set),
            "val_samples": len(val_set),
            "parameters_count": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "world_size": ranks.world_size,
            **trainer_identity(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
        if args.resume is None:
            run_name = args.run_name or f"{args.model}-{info.name}-{now():%Y%m%d-%H%M%S}"
            run_id = store.create_run(run_name, args.model, info.name, config, params)
        else:
            run_id, run_name = args.resume, store.get_run(args.resume)["name"]
            # The parameters row is honoured as it stands, except a stop or pause left
            # from before: resuming is asking the run to go on.
            state = store.get_parameters(run_id)
            if state.stop_train or state.pause_train:
                store.submit_parameters(run_id, stop_train=False, pause_train=False)
            store.reopen_run(run_id)
            seen_version, handled_rollback = 0, (  # adopt the row now; a bad count counts as 0
                0 if "rollback_request" in state.rejected() else state.rollback_request)
    # What rank 0 found, on every rank: they take the same branch and the same versions.
    run_id, run_name, seen_version, handled_rollback = ranks.from_main(
        (run_id, run_name, seen_version, handled_rollback))
    run_dir = Path(args.checkpoint_dir) / f"run_{run_id}"
    if ranks.is_main:
        writer = BackgroundWriter(store, run_id, spill_dir=run_dir / "unwritten",
                                  spill_after_rows=args.buffer_rows)
        listener = ParameterListener(store, run_id, seen_version=seen_version)
        sampler = SystemSampler(writer, progress, device)
    else:
        writer, listener, sampler = NullWriter(), None, None
    ring = CheckpointRing(
        run_dir, keep=args.checkpoint_keep,
        on_saved=lambda c, size: writer.rows("checkpoints", [{
            "step": c.step, "epoch": c.epoch, "reason": c.reason, "path": str(c.path),
            "bytes": size, "dt": now()}]),
        on_removed=lambda c: writer.checkpoint_removed(c.step),
    )
    where = f" (rank {ranks.rank} of {ranks.world_size})" * ranks.distributed
    say(f"run {run_id} '{run_name}' on {device}{where}, database {describe_url(url)}")

    steps_per_epoch = len(train_loader)
    total = min(args.epochs * steps_per_epoch, args.max_steps or sys.maxsize)
    step, epoch, last_logged = 0, 1, -1
    stopping = paused = done = restarted = stop_asked = False
    doctor = Diagnostician(info.num_classes)
    best_val, logs_since_best = math.inf, 0
    deferred: ParameterState | None = None  # a version that must wait for the log to end
    interval_start, interval_samples = time.perf_counter(), 0

    def log(full_validation: bool) -> None:
        """One statistics row plus per-layer telemetry for the current step.

        Under torchrun the training figures are summed over the ranks, and rank 0
        validates and writes while the others wait for what it decided.
        """
        nonlocal last_logged, interval_start, interval_samples, paused, done
        train_loss, train_acc = metrics.summary(ranks.sum)
        if ranks.is_main:
            write_log(full_validation, train_loss, train_acc)
        paused, done = ranks.any(paused, done)  # rank 0's diagnosis or early stop
        last_logged, interval_start, interval_samples = step, time.perf_counter(), 0

    def write_log(full_validation: bool, train_loss: float | None,
                  train_acc: float | None) -> None:
        ran_with, lr = params, learning_rate_in_force(optimizer)  # what this step ran with
        val_loss, val_acc = evaluate(
            model, val_loader, device,
            max_batches=None if full_validation else args.val_batches, probe=probe,
            # A change between validation batches would need the other ranks' agreement.
            between_batches=None if ranks.distributed else lambda: poll_control(True),
        )
        elapsed = time.perf_counter() - interval_start
        writer.statistics({
            "step": step, "epoch": epoch, "dt": now(),
            "optimizer": ran_with.optimizer, "learning_rate": lr,
            "weight_decay": ran_with.weight_decay, "dropout": ran_with.dropout,
            "train_loss": train_loss, "train_accuracy": train_acc,
            "validate_loss": val_loss, "validate_accuracy": val_acc,
            "samples_per_second": interval_samples / elapsed if interval_samples else None,
        })
        telemetry = probe.rows(step)
        for table, rows in telemetry.items():
            writer.rows(table, rows)
        diagnose(train_loss, val_loss, telemetry["layer_statistics"], ran_with, lr)
        early_stop(val_loss)
        bar.set_postfix(loss=f"{train_loss if train_loss is not None else val_loss:.4f}",
                        val=f"{val_loss:.4f}", lr=f"{learning_rate_in_force(optimizer):.2e}")

    def diagnose(
        train_loss: float | None, val_loss: float, layers: list[dict[str, Any]],
        ran_with: Hyperparameters, lr: float,
    ) -> None:
        """Run the health rules on this log; a non-finite value pauses the run."""
        nonlocal paused
        record = StepRecord(
            step=step, train_loss=_float(train_loss), validate_loss=val_loss,
            learning_rate=lr, optimizer=ran_with.optimizer,
            weight_decay=ran_with.weight_decay, dropout=ran_with.dropout,
            layers=tuple(LayerRecord(
                name=r["layer_name"], act_mean=_float(r["act_mean"]),
                act_std=_float(r["act_std"]), zero_fraction=_float(r["zero_fraction"]),
                dead_fraction=_float(r["dead_fraction"]), grad_norm=r["grad_norm"],
                update_ratio=_float(r["update_ratio"]), has_nonlinearity=r["has_nonlinearity"],
            ) for r in layers),
        )
        for finding in doctor.observe(record):
            writer.event(finding.level, finding.code, finding.message, step=step,
                         layer_name=finding.layer, recommendation=finding.recommendation,
                         fix=finding.fix)
            if finding.code == "non_finite" and step > 0:
                paused = True  # before the next update

    def early_stop(val_loss: float) -> None:
        """seed 002: stop when validation has not improved for --early-stopping logs."""
        nonlocal best_val, logs_since_best, done
        if val_loss < best_val:
            best_val, logs_since_best = val_loss, 0
            return
        logs_since_best += 1
        if args.early_stopping and logs_since_best >= args.early_stopping and not done:
            done = True
            writer.event("info", "early_stopped", f"validation loss has not improved on "
                         f"{best_val:.4g} for {logs_since_best} logs: finishing at step {step}",
                         step=step)

    def checkpoint(reason: str, wait: bool = False) -> None:
        if not ranks.is_main:
            return  # the ranks hold the same weights: rank 0 saves them
        ring.save(step, epoch, model, optimizer, {"run_id": run_id, "parameters": vars(params)},
                  reason, wait=wait)

    def roll_back(target: int) -> int | None:
        """Restore the newest checkpoint at or before `target`; the step restored."""
        nonlocal restarted
        found = ranks.from_main(ring.newest_at_or_before(target))
        if found is None:
            writer.event("warning", "rollback_unavailable",
                         f"no checkpoint at or before step {target} to roll back to", step=step)
            return None
        loaded = read_restorable(ranks, run_dir, found, run_id, model)
        if isinstance(loaded, str):  # nothing changed: training goes on as it was
            writer.event("warning", "rollback_failed", f"no rollback to step {target}: "
                         f"{loaded}; training goes on from step {step}", step=step)
            return None
        writer.event("info", "rolled_back", f"rolled back from step {step} to the checkpoint "
                     f"of step {found.step}; steps after it are kept as an abandoned branch",
                     step=found.step)
        restore(found, loaded)
        restarted = True
        return found.step

    def restore(found: Checkpoint, loaded: Restorable) -> None:
        """Put a checked checkpoint into the live model and optimizer (nothing here can
        fail: read_restorable checked it); later rows become a branch."""
        nonlocal optimizer, params, step, epoch, last_logged
        model.load_state_dict(loaded.model_state)  # copies into the optimizer's parameters
        loaded.model_state.clear()  # the model holds the weights now: no second copy kept
        optimizer = loaded.optimizer
        set_dropout(model, loaded.parameters.dropout / 100)
        writer.rollback(found.step)
        ring.forget_after(found.step)
        params, step, epoch, last_logged = loaded.parameters, found.step, found.epoch, found.step
        progress.step = step
        metrics.reset()
        bar.n = step

    def adopt(state: ParameterState) -> None:
        """Apply a new parameters version at this step boundary.

        A value that is invalid (forced past the constraints, or written into an
        SQLite table older than its type checks) or that the model cannot take is
        rejected with a warning, and what was in force stays: all hyperparameters if
        one is bad, the one control (stop, pause, rollback) whose column is bad. The
        rest of the version is still honoured: a valid stop always stops.
        """
        nonlocal optimizer, params, stopping, paused, handled_rollback
        new, errors = state.hyperparameters()
        bad = state.rejected()
        fresh_request = state.new_rollback_request(handled_rollback) \
            and state.rollback_step is not None  # a bad step is answered by the rejection
        wants_rollback = fresh_request and "rollback_step" not in bad
        if new is not None and new != params and not wants_rollback and not paused:
            checkpoint("before_change")  # so a bad change can be undone
        restored = None
        if fresh_request:
            handled_rollback = state.rollback_request
        if wants_rollback:
            restored = roll_back(state.rollback_step)
        if new is not None:
            try:
                optimizer = apply_parameters(model, optimizer, params, new)
            except (ValueError, RuntimeError) as exc:
                new, errors = None, {"model": f"the model cannot take it ({exc})"}
        before = (stopping, paused)
        stopping = state.stop_train if "stop_train" not in bad else stopping
        paused = state.pause_train if "pause_train" not in bad else paused
        if errors or bad:
            writer.event("warning", "parameters_rejected", rejection(
                state.version, errors | bad, new or params, stopping, paused),
                step=step, version=state.version)
            if not adopted(new, params, restored, before, (stopping, paused)):
                return  # nothing of this version was adopted
        writer.acknowledge({
            "version": state.version, **vars(new or params), "stop_train": stopping,
            "pause_train": paused, "rollback_step": restored,
            "dt_updated": state.dt_updated or now(), "applied_step": step, "dt_applied": now(),
        })
        if new is not None:
            flags = ", paused" * paused + ", stopping" * stopping
            writer.event("info", "parameters_applied",
                         f"version {state.version} applied at step {step}: "
                         f"{describe_change(params, new)}{flags}",
                         step=step, version=state.version)
        if ranks.distributed:  # each rank says so: the proof that they agree on the step
            say(f"rank {ranks.rank}: version {state.version} applied at step {step}: "
                f"{describe(new or params)}{', stopping' * stopping}{', paused' * paused}")
        params = new or params

    def poll_control(during_log: bool = False) -> None:
        """Adopt a new version if one has arrived.

        Called at each step boundary and between validation batches, which sit at
        the same boundary: a change waits for one batch, not for a whole log. A
        rollback (and anything after it) waits for the log to finish.
        """
        nonlocal deferred, stop_asked
        for code, message in listener.notices() if listener is not None else ():
            writer.event("warning", code, message, step=step)  # a version it cannot take
        if not during_log and deferred is not None:
            state, deferred = deferred, None
            adopt(state)
        waiting = listener is not None and listener.changed.is_set()
        if during_log:
            if not waiting or (state := listener.take()) is None:
                return
        else:  # the step boundary: under torchrun, every rank learns rank 0's news here
            waiting, stop_asked = ranks.any(waiting, stop.requested.is_set())
            if not waiting:
                return
            state = ranks.from_main(listener.take() if listener is not None else None)
            if state is None:
                return
        if during_log and (deferred is not None or state.new_rollback_request(handled_rollback)):
            deferred = state
            return
        adopt(state)

    def wait_while_paused() -> None:
        """Keep the process alive and listening (the writer keeps the heartbeat)."""
        writer.status("paused")
        bar.set_postfix_str("paused: waiting for new parameters from the board")
        while paused and not stopping and not stop_asked:
            if listener is not None:
                listener.changed.wait(0.2)
            else:
                time.sleep(0.2)  # rank 0 brings the news to the next poll
            poll_control()
        if not stopping and not stop_asked:
            writer.status("running")

    bar = tqdm(total=total, disable=args.no_progress or not ranks.is_main, unit="step",
               dynamic_ncols=True)
    try:
        if resumed is None:
            writer.event("info", "run_started", f"run {run_id} started: {args.model} on "
                         f"{info.name}, {device}, {describe(params)}", step=0)
            if ranks.is_main:
                writer.rows("model_layers",
                            model_table(model, next(iter(val_loader))[0].to(device)))
            log(full_validation=False)  # step 0: the untrained model, the initial loss
            checkpoint("initial")
        else:
            interrupted_at = store.last_logged_step(run_id) if ranks.is_main else None
            if ranks.is_main:
                for why in ring.seed(store.checkpoints(run_id)):
                    writer.event("warning", "checkpoint_refused", f"{why}; it cannot be "
                                 "rolled back to")
            restore(*resumed)
            writer.event("info", "run_resumed", f"run {run_id} resumed from its checkpoint of "
                         f"step {step} (it had logged up to step {interrupted_at}); steps after "
                         "the checkpoint are kept as an abandoned branch", step=step)
            if ranks.distributed:
                say(f"rank {ranks.rank}: resumed run {run_id} at step {step}")
        model.train()
        while epoch <= args.epochs and not (stopping or done):
            bar.set_description(f"epoch {epoch}/{args.epochs}")
            restarted = False
            if ranks.distributed:
                train_loader.sampler.set_epoch(epoch)  # a different shuffle each epoch
            for i, (x, y) in enumerate(train_loader):
                poll_control()
                if paused:
                    wait_while_paused()
                stopping = stopping or stop_asked
                if stopping or restarted:
                    break

                # A full validation ends each epoch, unless epochs are shorter than a log.
                end_of_epoch = i == steps_per_epoch - 1 and steps_per_epoch >= args.log_every
                done = step + 1 >= total
                logging = (step + 1) % args.log_every == 0 or end_of_epoch or done

                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = net(x)
                loss = nn.functional.cross_entropy(logits, y)
                job_loss = ranks.mean(loss)  # every rank sees a blow-up on any rank
                if not torch.isfinite(job_loss):  # pause before the update can spread it
                    paused = True
                    doctor.note_blow_up(learning_rate_in_force(optimizer))
                    writer.event(
                        "error", "non_finite",
                        f"the training loss is {job_loss.item()} at step {step + 1}: training "
                        "paused before the update", step=step,
                        recommendation="roll back to an earlier checkpoint and lower the "
                        f"learning rate (now {params.learning_rate:g})",
                        fix={"learning_rate": params.learning_rate / 10},
                    )
                    done = False
                    continue
                if args.lr_schedule != "none":
                    factor = schedule_factor(args.lr_schedule, step, total)
                    for group in optimizer.param_groups:
                        group["lr"] = params.learning_rate * factor
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if params.grad_clip > 0:
                    nn.utils.clip_grad_norm_(trainable(model), params.grad_clip)
                probing = logging and ranks.is_main
                if probing:
                    probe.before_update()  # gradient norms, weights before the step
                optimizer.step()
                if probing:
                    probe.after_update()  # update:parameter ratios
                metrics.add(loss, logits, y)
                step += 1
                samples = y.shape[0] * ranks.world_size  # the job's, not this rank's
                interval_samples += samples
                progress.step, progress.samples = step, progress.samples + samples
                bar.update()

                if logging:
                    log(full_validation=end_of_epoch or done)
                if step % args.checkpoint_every == 0:
                    checkpoint("periodic")
                if done:
                    break
            else:
                epoch += 1

        status = "stopped" if stopping else "finished"
        epoch = min(epoch, args.epochs)
        if step != last_logged:
            log(full_validation=True)  # the final validation of a stopped run
        checkpoint("final", wait=True)
        writer.event("info", f"run_{status}", f"run {status} at step {step}, epoch {epoch}",
                     step=step)
        writer.status(status, ended=True)
        if ranks.distributed:  # equal fingerprints: every rank made the same updates
            fingerprint = sum(p.detach().double().abs().sum().item() for p in model.parameters())
            say(f"rank {ranks.rank}: {status} at step {step}, weights {fingerprint:.12g}")
        return 0
    except KeyboardInterrupt:
        writer.event("warning", "run_interrupted", f"interrupted at step {step}", step=step)
        writer.status("stopped", ended=True)
        return 130
    except Exception as exc:
        writer.event("error", "run_failed", f"{type(exc).__name__}: {exc}", step=step)
        writer.status("failed", ended=True)
        raise
    finally:
        bar.close()
        ring.flush()
        if ranks.is_main:
            sampler.close()
            listener.close()
            if not writer.close():
                print(f"warning: some rows could not be written to the database; those kept "
                      f"in {run_dir / 'unwritten'} are written by `train.py --resume {run_id}`",
                      file=sys.stderr)
            store.close()
        ranks.close()


if __name__ == "__main__":
    sys.exit(main())
