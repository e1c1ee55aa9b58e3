"""A transformers Trainer run whose data fails at one sample: the uncaught error ends
the process inside Trainer.train(), which has no exception hook for callbacks.

    python tests/hf_crash_run.py DB_URL OUTPUT_DIR
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from livetrain.transformers import LiveTrainingCallback

BAD_SAMPLE = 300


class Tokens(Dataset):
    """Random token ids labelled by their first token; sample BAD_SAMPLE cannot be read."""

    def __len__(self) -> int:
        return 512

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if index == BAD_SAMPLE:
            raise RuntimeError(f"sample {BAD_SAMPLE} cannot be read")
        ids = torch.randint(5, 100, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": int(ids[0] > 50)}


def main() -> None:
    url, output = sys.argv[1], sys.argv[2]
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    args = TrainingArguments(output_dir=output, max_steps=200, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", disable_tqdm=True,
                             use_cpu=True)
    callback = LiveTrainingCallback(db=url, name="crash", log_every=5, checkpoint_dir=output)
    Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Tokens(),
            callbacks=[callback]).train()


if __name__ == "__main__":
    main()
