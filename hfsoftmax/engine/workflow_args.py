"""Checks of the trainer's workflow flags (``--init-from``, ``--init-rows``,
``--val-filelist`` / ``--val-rec``, ``--train-folder``), called by
:func:`hfsoftmax.engine.config.validate_args`; each error names the flag, the value and the
fix (:class:`~hfsoftmax.engine.config.UsageError`, exit code 2).
"""
from __future__ import annotations

import argparse
import os

__all__ = ["validate_workflow_args", "val_rec_split"]


def val_rec_split(path: str) -> tuple[str, str]:
    """``--val-rec`` as ``(folder, split)``: a folder means its ``train.rec``; a ``X.rec``
    file means split ``X`` of its folder (``X.idx`` beside it)."""
    if os.path.isdir(path):
        return path, "train"
    folder, name = os.path.split(os.path.abspath(path))
    if not name.endswith(".rec"):
        raise ValueError(f"--val-rec {path}: expected an InsightFace folder or a .rec file")
    return folder, name[:-4]


def validate_workflow_args(args: argparse.Namespace) -> None:
    from .config import UsageError

    if args.init_from:
        if args.resume:
            raise UsageError(f"--init-from {args.init_from} starts a new run from backbone "
                             f"weights; --resume {args.resume} continues a run (its own "
                             "weights): give one of them")
        if not os.path.isfile(args.init_from):
            raise UsageError(f"--init-from file not found: {args.init_from}")
    if args.init_rows:
        if args.resume:
            raise UsageError(f"--init-rows {args.init_rows} starts a new run's classifier; "
                             f"--resume {args.resume} continues a run with its own rows: give "
                             "one of them")
        if not os.path.isfile(args.init_rows):
            raise UsageError(f"--init-rows file not found: {args.init_rows}")
    if args.train_folder and not os.path.isdir(args.train_folder):
        raise UsageError(f"--train-folder {args.train_folder} is not a folder; expected "
                         "DIR/<class>/<image> files")
    if args.val_filelist and args.val_rec:
        raise UsageError("give --val-filelist or --val-rec, not both")
    if args.val_prefix and not args.val_filelist:
        raise UsageError(f"--val-prefix {args.val_prefix} goes with --val-filelist")
    if args.val_filelist and not os.path.isfile(args.val_filelist):
        raise UsageError(f"--val-filelist file not found: {args.val_filelist}")
    if args.val_rec:
        try:
            folder, split = val_rec_split(args.val_rec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for ext in (".rec", ".idx"):
            if not os.path.isfile(os.path.join(folder, split + ext)):
                raise UsageError(f"--val-rec {args.val_rec}: {split}{ext} not found in "
                                 f"{folder}")
