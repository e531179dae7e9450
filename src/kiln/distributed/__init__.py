"""Parallelism applied from outside the plain model: process groups, DDP/FSDP2, activation
checkpointing. Nothing in kiln.models imports this package."""
