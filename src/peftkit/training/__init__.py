"""The Trainer's parts, one job per file.

config (TrainConfig) · optim (parameter groups, optimisers, schedules) · data (resumable sharded
sampling, batches to device) · tasks (loss and predictions for HF-style batches) · state (training
state without pickle, RNG, atomic directories) · distributed (torchrun / DDP) · monitor (progress bar,
JSONL log). ``peftkit.trainer.Trainer`` puts them together.
"""
