"""Built-in training loggers: jsonl, csv, tensorboard."""
