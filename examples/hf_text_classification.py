"""A Hugging Face `Trainer`, watched and steered live: a tiny BERT learns the sentiment of
short reviews.

Nothing is downloaded: the reviews are generated from word lists, the vocabulary is
the words they use (split on whitespace), and the BERT is built from a config with
random weights. One callback puts the run on the board; change its learning rate,
weight decay, dropout or clipping there (the Trainer's linear decay follows the new
lr), pause it or stop it.

    python examples/hf_text_classification.py --db sqlite:///training.db --max-steps 600
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    EvalPrediction,
    Trainer,
    TrainingArguments,
)

from livetrain.transformers import LiveTrainingCallback

POSITIVE = ("great", "wonderful", "moving", "brilliant", "delightful", "superb", "charming",
            "gripping", "funny", "beautiful")
NEGATIVE = ("boring", "dull", "awful", "clumsy", "tedious", "bland", "messy", "weak",
            "pointless", "painful")
NEUTRAL = ("the", "movie", "film", "plot", "acting", "story", "was", "and", "quite", "really",
           "i", "found", "it", "characters", "ending", "music", "a", "bit", "overall", "script")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]")  # ids 0, 1, 2
MAX_LENGTH = 24


def review(rng: random.Random) -> tuple[str, int]:
    """Filler words and two cues of the review's sentiment, each a word of it or a
    negated word of the other ("not funny"): the model must read words in context."""
    label = rng.randrange(2)
    mine, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
    words = rng.choices(NEUTRAL, k=rng.randint(6, 14))
    for _ in range(2):
        cue = rng.choice(mine) if rng.random() < 0.6 else f"not {rng.choice(other)}"
        words.insert(rng.randrange(len(words) + 1), cue)
    return " ".join(words), label


def corpus(size: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(size)]


def vocabulary(texts: list[str]) -> dict[str, int]:
    """Every word seen in training, after the special tokens: a whitespace tokenizer."""
    words = sorted({word for text in texts for word in text.split()})  # "not" included
    return {token: index for index, token in enumerate([*SPECIALS, *words])}


class Reviews(Dataset):
    """The reviews as the dicts a BERT takes: [CLS] + word ids, padded, with their mask."""

    def __init__(self, reviews: list[tuple[str, int]], vocab: dict[str, int]) -> None:
        self.items = [encode(text, label, vocab) for text, label in reviews]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def encode(text: str, label: int, vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    ids = [vocab["[CLS]"], *(vocab.get(w, vocab["[UNK]"]) for w in text.split())][:MAX_LENGTH]
    padding = MAX_LENGTH - len(ids)
    return {"input_ids": torch.tensor(ids + [vocab["[PAD]"]] * padding),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * padding),
            "labels": torch.tensor(label)}


def tiny_bert(vocab_size: int) -> BertForSequenceClassification:
    """Two layers of 64 units, random weights: it trains in seconds on a CPU."""
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=MAX_LENGTH, num_labels=2))


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`eval_accuracy` as a fraction: the callback logs it as the validation accuracy."""
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1)
                                      == prediction.label_ids))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A tiny BERT on synthetic reviews, steered live")
    parser.add_argument("--db", default=None,
                        help="SQLAlchemy URL (default: $DATABASE_URL, else sqlite:///training.db)")
    parser.add_argument("--name", default="hf-sentiment-bert", help="the run's name on the board")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=20, help="steps between logged rows")
    parser.add_argument("--output-dir", default="hf_output", help="the Trainer's output_dir")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    train, test = corpus(2000, seed=0), corpus(300, seed=1)
    vocab = vocabulary([text for text, _ in train])
    callback = LiveTrainingCallback(db=args.db, name=args.name, log_every=args.log_every,
                                    dataset="synthetic-reviews")
    trainer = Trainer(
        model=tiny_bert(len(vocab)),
        args=TrainingArguments(
            output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.lr,
            per_device_train_batch_size=32, weight_decay=0.01, warmup_steps=20,
            eval_strategy="steps", eval_steps=2 * args.log_every, logging_steps=args.log_every,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True),
        train_dataset=Reviews(train, vocab), eval_dataset=Reviews(test, vocab),
        compute_metrics=accuracy, callbacks=[callback])
    trainer.train()
    run = callback.run
    print(f"run {run.run_id} {run.status} after {run.global_step} steps: "
          f"{100 * trainer.evaluate()['eval_accuracy']:.1f} % of the test reviews right")


if __name__ == "__main__":
    main()
