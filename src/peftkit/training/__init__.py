"""The Trainer's parts, one job per file.

config (TrainConfig) · optim (parameter groups, optimisers, schedules) · data (resumable sharded
sampling, batches to device) · tasks (loss and predictions for HF-style batches) · setup (device,
activation checkpointing, DDP, compile) · evaluation · progress (counters, best-so-far rule) ·
state (training state without pickle, RNG, atomic directories) · rundir (checkpoint-N, best/, the
log) · distributed (torchrun) · monitor (progress bar, JSONL log). ``peftkit.trainer.Trainer`` puts
them together.
"""
