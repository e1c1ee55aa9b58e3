"""Train a model while a database carries its telemetry out and its parameters in.

    python train.py                       # small CNN on the offline MNIST sample, SQLite
    python train.py --db postgresql://postgres@127.0.0.1/postgres --lr 1e-3
    python train.py --model my_net.py:Net # your own nn.Module, this loop
    torchrun --nproc_per_node=2 train.py --db postgresql://...   # one run, two processes

The playground CLI, and the first client of `livetrain.LiveRun`: the loop below is an
ordinary PyTorch loop, and LiveRun does the rest. The board (or any SQL client)
changes optimizer / learning rate / weight decay / dropout / clipping, pauses, rolls
back or stops in the `parameters` row; LiveRun applies each change at the next step
boundary. Under torchrun, rank 0 alone talks to the database and every rank applies a
change at the same step.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from livetrain import LiveRun, ResumeRefusedError
from livetrain.db.store import Store, UnusableDatabaseError, now, open_store
from livetrain.playground import sweep
from livetrain.playground.data import (
    DatasetInfo,
    DatasetUnavailable,
    load_datasets,
    make_loaders,
)
from livetrain.playground.models import ModelUnavailable, build_model, initialize
from livetrain.playground.options import parse_args, resume_options
from livetrain.playground.schedules import lr_scheduler
from livetrain.playground.user_model import build_user_model, first_batch, is_user_model
from livetrain.trainer.allocator import keep_freed_memory
from livetrain.trainer.distributed import Ranks
from livetrain.trainer.inspection import model_device
from livetrain.trainer.ownership import say
from livetrain.trainer.signals import StopSignal
from livetrain.trainer.steering import build_optimizer, sparse_refusal, trainable
from livetrain.trainer.telemetry import evaluate


@dataclass
class Playground:
    """What one run trains: the model, its data and how to validate it."""

    model: nn.Module
    net: nn.Module  # what trains: the model, or DDP around it under torchrun
    train_loader: DataLoader
    val_loader: DataLoader
    info: DatasetInfo
    train_samples: int
    val_samples: int


class Validation:
    """train.py's validation: --val-batches batches at a log, all of them at an epoch's end."""

    def __init__(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 batches: int) -> None:
        self.model, self.loader, self.device, self.batches = model, loader, device, batches

    def __call__(self, full: bool = False) -> dict[str, float | int | None]:
        return evaluate(self.model, self.loader, self.device,
                        max_batches=None if full else self.batches)


def build(args: argparse.Namespace, ranks: Ranks, device: torch.device) -> Playground:
    """The data and the model; DatasetUnavailable or ModelUnavailable say why not."""
    train_set, val_set, info = load_datasets(
        args.dataset, args.data_dir, seed=args.seed, normalize=not args.no_normalize)
    shape = (info.num_classes, info.in_channels, info.image_size)
    if is_user_model(args.model):
        model = build_user_model(args.model, *shape, dropout=args.dropout / 100)
    else:
        model = build_model(args.model, *shape, dropout=args.dropout / 100,
                            pretrained=args.pretrained, transfer=args.transfer)
    if args.overfit_batches:  # seed 003: first make sure the model can learn a little
        train_set = Subset(train_set, range(min(len(train_set),
                                                args.overfit_batches * args.batch_size)))
    train_loader, val_loader = make_loaders(
        train_set, val_set, args.batch_size, args.workers, args.seed,
        shard=(ranks.rank, ranks.world_size) if ranks.distributed else None)
    if is_user_model(args.model):  # lazy layers take their shapes before anything reads them
        first_batch(args.model, model, val_loader, info.num_classes)
    initialize(model, args.init)
    model.to(device)
    return Playground(model, ranks.wrap(model, device), train_loader, val_loader, info,
                      len(train_set), len(val_set))


def run_config(args: argparse.Namespace, play: Playground) -> dict[str, object]:
    """The run's options and data, kept in runs.config (a resume starts from them)."""
    return vars(args) | {
        "num_classes": play.info.num_classes, "classes": list(play.info.classes),
        "in_channels": play.info.in_channels, "image_size": play.info.image_size,
        "train_samples": play.train_samples, "val_samples": play.val_samples,
        "python": platform.python_version(),
    }


def resolved_options(args: argparse.Namespace, ranks: Ranks,
                     stop: StopSignal) -> argparse.Namespace | str:
    """The options to train with (a resumed run's own), or the error that ends the command.
    Rank 0 opens the database first, so a bad --db fails in seconds, before any data."""
    found: argparse.Namespace | str | None = None
    if ranks.is_main:
        store: Store | None = None
        try:
            store = open_store(args.db)
            if args.resume is not None:
                found = resume_options(args, store, stop.requested)
        except (UnusableDatabaseError, LookupError) as exc:
            found = str(exc)
        finally:
            if store is not None:
                store.close()
    found = ranks.from_main(found)
    if found is None or isinstance(found, str):
        return found or args
    if ranks.distributed:
        found.device = args.device  # the process group already runs on this one
    return found


def train(run: LiveRun, play: Playground, args: argparse.Namespace, ranks: Ranks,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, bar: ProgressBar) -> None:
    """The epochs: an ordinary PyTorch loop, steered through `run`."""
    device = model_device(play.model)
    while run.epoch <= args.epochs and not run.should_stop:
        epoch, rollbacks = run.epoch, run.rollbacks
        if ranks.distributed:
            play.train_loader.sampler.set_epoch(epoch)  # a different shuffle each epoch
        for x, y in play.train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = play.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            run.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # else a parameter-free or frozen model: nothing learns
                loss.backward()
            run.optimizer.step()
            if scheduler is not None:
                scheduler.step()
            run.step(loss=loss, outputs=logits, targets=y)
            bar.show(run, epoch, args.epochs)
            if run.should_stop or run.rollbacks != rollbacks:
                break  # a rollback restarts the epoch it went back to
        else:
            run.epoch += 1
    run.epoch = min(run.epoch, args.epochs)


class ProgressBar:
    """tqdm's bar over the run's steps, with the latest log's figures."""

    def __init__(self, total: int, disable: bool) -> None:
        self.bar = tqdm(total=total, disable=disable, unit="step", dynamic_ncols=True)
        self.shown_log = -1

    def show(self, run: LiveRun, epoch: int, epochs: int) -> None:
        if run.global_step >= self.bar.n:
            self.bar.update(run.global_step - self.bar.n)
        else:  # rolled back
            self.bar.n = run.global_step
            self.bar.refresh()
        if run.logbook.last_logged != self.shown_log and run.logbook.last:
            self.shown_log, last = run.logbook.last_logged, run.logbook.last
            self.bar.set_description(f"epoch {epoch}/{epochs}")
            self.bar.set_postfix(loss=f"{last['train_loss'] or float('nan'):.4f}",
                                 val=f"{last['validate_loss'] or float('nan'):.4f}",
                                 lr=f"{last['learning_rate']:.2e}")

    def close(self) -> None:
        self.bar.close()


def run_sweep(args: argparse.Namespace, argv: list[str], ranks: Ranks, stop: StopSignal) -> int:
    """--sweep: one train.py process per combination of values, --parallel at a time."""
    if ranks.distributed:
        say("error: --sweep starts processes of its own; run it without torchrun")
        return 2
    base = sweep.without_sweep(argv)
    combos = sweep.combinations(args.sweep)
    for combo in combos:
        parse_args([*base, *combo])  # a bad value exits 2 here, before any run exists
    try:  # and a bad --db ends here, not in every child
        open_store(args.db).close()
    except UnusableDatabaseError as exc:
        say(f"error: {exc}")
        return 1
    return sweep.run(Path(__file__).resolve(), base, combos, args.parallel, args.run_name,
                     stop.requested)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stop = StopSignal()  # first thing: a Ctrl-C during setup still ends the run cleanly
    keep_freed_memory()  # before the first tensor: no page-fault storm at every step
    ranks = Ranks()
    if args.sweep:
        return run_sweep(args, argv, ranks, stop)
    device = ranks.device(args.device)
    ranks.start(device)  # under torchrun, before the first collective
    found = resolved_options(args, ranks, stop)
    if isinstance(found, str):
        say(f"error: {found}")
        return 130 if stop.requested.is_set() else 1
    args = found
    torch.manual_seed(args.seed)
    device = ranks.device(args.device)
    try:
        play = build(args, ranks, device)
    except (DatasetUnavailable, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    optimizer = build_optimizer(args.optimizer, trainable(play.model), args.lr, args.weight_decay)
    if why := sparse_refusal(play.model, optimizer):
        print(f"error: --model {args.model} with --optimizer {args.optimizer}: {why}",
              file=sys.stderr)
        return 1
    total = min(args.epochs * len(play.train_loader), args.max_steps or sys.maxsize)
    scheduler = lr_scheduler(args.lr_schedule, optimizer, total)
    name = args.run_name or f"{args.model}-{play.info.name}-{now():%Y%m%d-%H%M%S}"
    bar = ProgressBar(total, disable=args.no_progress or not ranks.is_main)
    try:
        with LiveRun(
            play.model, optimizer, db=args.db, name=name, log_every=args.log_every,
            validate=Validation(play.model, play.val_loader, device, args.val_batches),
            config=run_config(args, play), scheduler=scheduler,
            num_classes=play.info.num_classes, grad_clip=args.grad_clip,
            steps_per_epoch=len(play.train_loader), max_steps=total,
            early_stopping=args.early_stopping, checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep,
            buffer_rows=args.buffer_rows, model_name=args.model, dataset=play.info.name,
            resume=args.resume, nan_guard=args.nan_guard,
        ) as run:
            if stop.requested.is_set():
                run.request_stop()
            train(run, play, args, ranks, scheduler, bar)
    except ResumeRefusedError as exc:
        print(f"error: cannot resume run {args.resume}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        bar.close()
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
