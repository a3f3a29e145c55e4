"""Checkpoint loaders, one file per foreign format; load_checkpoint() sniffs the format."""
