"""Errors raised while reading checkpoints."""


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message names the file, the problem and the fix."""
