"""Framework callbacks' overhead: each framework's own Trainer with and without livetrain's
`LiveTrainingCallback`, on the same steps.

Two pairs of variants, each run in a fresh process, interleaved in rounds (the pair's
order alternates from round to round, so a slow drift of the machine weighs on both):
  lightning       a Lightning 2.x Trainer fitting train.py's small CNN on mnist5k
                  (batch 64, Adam at 3e-4, no validation loop), without a callback;
  lightning+live  the same, with livetrain.lightning.LiveTrainingCallback (SQLite in a
                  temporary folder, log_every 50, per-layer telemetry at each log);
  hf              a transformers 5.x Trainer on a random-init BERT-tiny (the smallest
                  BERT Google published: 2 layers, hidden 128, 2 heads, BERT's 30,522-token
                  vocabulary, 4.4 M parameters; built from a BertConfig, no download)
                  classifying random token sequences, without a callback;
  hf+live         the same, with livetrain.transformers.LiveTrainingCallback.

Each process times the same span with a timing callback placed after livetrain's in
both variants: from the end of the first step (which pays the lazy initialisations
of torch and of each framework) to the end of the Trainer's train-end hooks, so the
callback's closing work (the last log, the final checkpoint, draining its writer) is
counted. The framework's and the run's setup before the first step is not.

The budget is checked on the ratio of the medians (with-callback median over
without-callback median); beside it, each variant's fastest time, and the median and
range of the ratios within a round. As in bench.overhead, every process runs torch
on one intra-op thread (--threads 1, see bench/overhead.py for why) and the last
column is each variant's most page faults in one run (the whole process).

Allocator: every child, with and without the callback alike, fixes glibc's mmap and
trim thresholds (livetrain/trainer/allocator.py, what train.py does) before its first
tensor; without it a process can settle into faulting its freed step buffers in
again at every step, a noise of up to 20 % that has nothing to do with livetrain.

    python -m bench.frameworks [--rounds 5] [--steps 300] [--hf-steps 200]

The callbacks' cost is mostly a fixed ~0.5 ms a step (the step's bookkeeping, and a
log's telemetry every 50 steps; under transformers the gradient check before each
update reads the norm the Trainer computed, under Lightning it computes it): 1 to 2 %
of these steps (55 to 80 ms here), 5 to 10 % of a 20 ms step of a toy 0.2 M-parameter
BERT (hidden 64), which is why the transformers pair uses a BERT size that is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics as stats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import budget

ROOT = Path(__file__).resolve().parent.parent
LOG_EVERY = 50
PAIRS = {"lightning": ("lightning", "lightning+live"), "transformers": ("hf", "hf+live")}
# BERT-tiny (google/bert_uncased_L-2_H-128_A-2's sizes), sequences of 64 tokens, batch 16.
BERT = {"vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 512,
        "num_labels": 2}
SEQUENCE, BERT_BATCH, BERT_SAMPLES = 64, 16, 2048


class SpanTimer:
    """perf_counter at the end of the first step and at the end of training; the
    framework-specific subclasses call `stepped` and `ended` from their hooks."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.finished: float | None = None

    def stepped(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def ended(self) -> None:
        self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.started is None or self.finished is None:
            raise RuntimeError("the timer saw no step or no end of training")
        return self.finished - self.started


def run_lightning(live: bool, steps: int, db: str, logdir: str) -> tuple[float, int]:
    """A Lightning fit of `steps` steps: the timed span's seconds and the steps timed."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from livetrain.playground.data import load_datasets, make_loaders
    from livetrain.playground.models import build_model

    class Classifier(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            logits = self.model(x)
            return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits.detach()}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=3e-4)

    class Timer(SpanTimer, pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            self.stepped()

        def on_train_end(self, *args: Any) -> None:
            self.ended()

    torch.manual_seed(0)
    train_set, val_set, info = load_datasets("mnist5k")
    train_loader, _ = make_loaders(train_set, val_set, 64)
    module = Classifier(build_model("smallcnn", info.num_classes, info.in_channels,
                                    info.image_size, 0.5))
    timer = Timer()
    callbacks: list[pl.Callback] = [timer]
    if live:
        from livetrain.lightning import LiveTrainingCallback

        callbacks.insert(0, LiveTrainingCallback(
            db=db, name="bench-lightning", log_every=LOG_EVERY,
            checkpoint_dir=Path(logdir) / "ck"))
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=logdir, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks)
    trainer.fit(module, train_loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"the fit ended at step {trainer.global_step}, not {steps}")
    if live and callbacks[0].run.global_step != steps:
        raise RuntimeError(f"the live run counted {callbacks[0].run.global_step} steps")
    return timer.seconds, steps - 1


def token_dataset() -> Any:
    """Random token sequences labelled by whether token 7 occurs more than token 8: a
    task a BERT can start to learn, and nothing to download."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, BERT["vocab_size"], (BERT_SAMPLES, SEQUENCE), generator=generator)
    labels = ((ids == 7).sum(1) > (ids == 8).sum(1)).long()
    mask = torch.ones_like(ids)
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(ids, mask, labels, strict=True)]


def run_transformers(live: bool, steps: int, db: str, logdir: str) -> tuple[float, int]:
    """A transformers Trainer run of `steps` steps: the timed span and the steps timed."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Timer(SpanTimer, TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.stepped()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.ended()

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT))
    args = TrainingArguments(
        output_dir=str(Path(logdir) / "hf"), max_steps=steps,
        per_device_train_batch_size=BERT_BATCH, learning_rate=3e-4, seed=0, use_cpu=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    timer = Timer()
    callbacks: list[TrainerCallback] = [timer]
    if live:
        from livetrain.transformers import LiveTrainingCallback

        callbacks.insert(0, LiveTrainingCallback(
            db=db, name="bench-transformers", log_every=LOG_EVERY,
            checkpoint_dir=Path(logdir) / "ck"))
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                      callbacks=callbacks)
    trainer.train()
    if trainer.state.global_step != steps:
        raise RuntimeError(f"the run ended at step {trainer.state.global_step}, not {steps}")
    if live and callbacks[0].run.global_step != steps:
        raise RuntimeError(f"the live run counted {callbacks[0].run.global_step} steps")
    return timer.seconds, steps - 1


def child(variant: str, steps: int, db: str, logdir: str) -> dict[str, float]:
    """One measurement in this (fresh) process: seconds and seconds per timed step."""
    from livetrain.trainer.allocator import keep_freed_memory

    keep_freed_memory()  # before the first tensor, in every variant alike
    runner = run_lightning if variant.startswith("lightning") else run_transformers
    seconds, timed = runner(variant.endswith("+live"), steps, db, logdir)
    return {"seconds": seconds, "per_step": seconds / timed}


def measure(variant: str, steps: int, threads: int) -> tuple[float, int]:
    """One run of one variant in a fresh process and a fresh SQLite database: its
    seconds per timed step and the child's minor page faults (setup included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'bench.db'}"
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        done = subprocess.run(
            [sys.executable, "-m", "bench.frameworks", "--variant", variant,
             "--steps", str(steps), "--db", db, "--logdir", tmp],
            cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
    return json.loads(done.stdout.strip().splitlines()[-1])["per_step"], faults


def interleaved(pair: tuple[str, str], steps: int, rounds: int,
                threads: int) -> dict[str, tuple[float, ...]]:
    """variant -> (median ms/step, fastest ms/step, ratio of its median to the bare
    variant's, the median and range of the ratios within a round, most page faults)."""
    times: dict[str, list[float]] = {v: [] for v in pair}
    faults: dict[str, list[int]] = {v: [] for v in pair}
    for index in range(rounds):
        for variant in pair if index % 2 == 0 else pair[::-1]:
            per_step, count = measure(variant, steps, threads)
            times[variant].append(per_step)
            faults[variant].append(count)
    bare = times[pair[0]]
    out = {}
    for variant, seconds in times.items():
        ratios = [s / b for s, b in zip(seconds, bare, strict=True)]
        out[variant] = (1000 * stats.median(seconds), 1000 * min(seconds),
                        stats.median(seconds) / stats.median(bare), stats.median(ratios),
                        min(ratios), max(ratios), max(faults[variant]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300, help="Lightning steps per run")
    p.add_argument("--hf-steps", type=int, default=200, help="transformers steps per run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every variant (see bench/overhead.py)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--logdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant:  # a child process: one measurement
        print(json.dumps(child(args.variant, args.steps, args.db, args.logdir)))
        return 0

    table, verdicts = [], []
    for framework, steps in (("lightning", args.steps), ("transformers", args.hf_steps)):
        pair = PAIRS[framework]
        result = interleaved(pair, steps, args.rounds, args.threads)
        table += [(framework, v, *r) for v, r in result.items()]
        verdicts.append(budget.Verdict(f"{framework} callback overhead, x without it",
                                       result[pair[1]][2], budget.OVERHEAD_RATIO, "x"))

    print(f"\nframework callbacks' overhead: Lightning, smallcnn on mnist5k, batch 64, "
          f"{args.steps} steps; transformers, BERT-tiny, batch {BERT_BATCH} x {SEQUENCE} "
          f"tokens, {args.hf_steps} steps; LiveTrainingCallback on SQLite, log_every "
          f"{LOG_EVERY}; {args.threads} torch thread(s); {args.rounds} interleaved rounds "
          "(x without: ratio of the medians)")
    print(f"{'framework':<13} {'variant':<15} {'median ms/step':>15} {'fastest':>8} "
          f"{'x without':>10} {'per round: median':>18} {'min-max':>12} "
          f"{'page faults, max':>17}")
    for framework, variant, median, fastest, ratio, per_round, low, high, faults in table:
        print(f"{framework:<13} {variant:<15} {median:>15.2f} {fastest:>8.2f} {ratio:>10.3f} "
              f"{per_round:>18.3f} {low:>6.3f}-{high:.3f} {faults / 1e6:>16.2f}M")
    print(f"reproduce: python -m bench.frameworks --rounds {args.rounds} --steps {args.steps} "
          f"--hf-steps {args.hf_steps} --threads {args.threads}")
    return budget.report(verdicts)


if __name__ == "__main__":
    raise SystemExit(main())
