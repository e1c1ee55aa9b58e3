"""The trainer side: what runs inside the training process, beside the loop."""
