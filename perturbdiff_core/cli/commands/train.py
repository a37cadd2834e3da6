"""``perturbdiff train``: train the diffusion model of a config into a run folder (or resume it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ...errors import ConfigError
from ...names import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOCK_FILE,
    LOG_FILE,
    PLUGINS_FILE,
    PREVIOUS_CHECKPOINT,
    RUNS_DIR,
    SPLIT_FILE,
    STATE_FILE,
)

if TYPE_CHECKING:  # torch and the data stack are imported when a command runs, not for --help
    from ...runs.config import RunConfig
    from ...runs.training import Trainer

EPILOG = f"""\
--set takes key=value pairs, several per flag and the flag repeatable
(--set a=1 b=2 --set c=3 sets all three); values are parsed as YAML, e.g.
  --set train.steps=200 split.holdout=[CD4T] data.batch_key=null
Resolution: defaults <- CONFIG.yaml <- --set. The run folder (--out, default
{RUNS_DIR}/<config name>) receives {CONFIG_FILE} (the resolved config), {PLUGINS_FILE}
(the distribution and version of each plug-in it names), {SPLIT_FILE}, {STATE_FILE}, {LOG_FILE} and {CHECKPOINT_DIR}/{LAST_CHECKPOINT} (written atomically).
Ctrl-C and SIGTERM save a checkpoint of the last completed step (exit 130 and 143); --resume
continues it exactly (the same losses as an uninterrupted run). The previous checkpoint is kept
as {CHECKPOINT_DIR}/{PREVIOUS_CHECKPOINT} and used, with a note, when {LAST_CHECKPOINT} cannot be read. One run at a time
holds a run folder (the lock file {LOCK_FILE} names it); a second is refused. A relative data.path that does not exist is looked
up by file name in $PERTURBDIFF_DATA (or ../shared/data beside the source tree).
Several processes or GPUs: torchrun --nproc_per_node N -m perturbdiff_core train ...
(train.batch_size is the global batch; rank 0 writes the run folder; docs/distributed.md).
"""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, ``--out``, ``--set`` and ``--resume``: shared by ``train`` and ``run``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="run configuration (see examples/)")
    parser.add_argument("--out", metavar="DIR", default=None, help=f"run folder (default: {RUNS_DIR}/<config name>)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys (values parsed as YAML); several pairs per flag, repeatable",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
    parser.add_argument(
        "--init-from", metavar="RUN_DIR_OR_CHECKPOINT", default=None,
        help="start from a (pre-)trained run's weights, genes aligned by name (sets train.init_from)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff train``."""
    parser = subparsers.add_parser(
        "train",
        help="train the diffusion model of a config into a run folder",
        description="Train the RKHS diffusion model on the training conditions of a config's split.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def config_of(args: argparse.Namespace) -> RunConfig:
    """The resolved configuration of ``args``: defaults <- CONFIG.yaml <- ``--set`` <- ``--init-from``, paths resolved."""
    from ...runs.config import load_config, resolved

    if args.init_from is None:
        return resolved(load_config(args.config, args.overrides))
    if args.resume:
        raise ConfigError(
            "--init-from starts a new run from another run's weights and --resume continues this run's own "
            "checkpoint; give only one of them."
        )
    return resolved(load_config(args.config, [*args.overrides, f"train.init_from={json.dumps(args.init_from)}"]))


@contextmanager
def started(args: argparse.Namespace, config: RunConfig) -> Iterator[Trainer]:
    """The trainer of ``config`` in the run folder of ``args`` (checkpoint loaded with ``--resume``), the
    folder held by this run for the whole block (:class:`~perturbdiff_core.runs.folder.RunFolder`: one run
    at a time, and a run refused while it is set up leaves no folder behind); says what ``train.init_from`` loaded."""
    from ...runs import distributed
    from ...runs.config import run_dir_for
    from ...runs.folder import RunFolder
    from ...runs.training import Trainer

    with RunFolder(run_dir_for(config, args.out), lock=distributed.is_main()) as folder:
        trainer = Trainer(config, folder.path, resume=args.resume, progress=not args.quiet)
        folder.keep()
        if trainer.transfer is not None and distributed.is_main():
            print(f"perturbdiff: {trainer.transfer.line()}", file=sys.stderr)
        yield trainer


def fit(trainer: Trainer, command: str = "train") -> int:
    """Train; 0 when done, 130 after Ctrl-C and 143 after SIGTERM (checkpoint saved, one line saying how
    to resume ``command``)."""
    from ...runs import distributed
    from ...runs.folder import RunDir
    from ...runs.training import TrainingInterrupted

    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        run_dir = trainer.run_dir
        if distributed.is_main():
            launch = " under the same torchrun launch" if distributed.world_size() > 1 else ""
            print(
                f"perturbdiff: {stop}; resume with: perturbdiff {command} {RunDir(run_dir).config} --out {run_dir} "
                f"--resume{launch}",
                file=sys.stderr,
            )
        return stop.status
    return 0


def run(args: argparse.Namespace) -> int:
    """Train (or resume) and report where the run is; under torchrun, as one rank of a data-parallel job."""
    from ...runs import distributed
    from ...runs.training import resolve_device

    config = config_of(args)
    with distributed.process_group(resolve_device(config.train.device)), started(args, config) as trainer:
        if status := fit(trainer):
            return status
        if distributed.is_main():
            log = trainer.log()
            last = log.iloc[-1] if len(log) else None
            summary = "" if last is None else f"; last logged loss {last['loss']:.4g}"
            print(f"Trained {trainer.step} steps into {trainer.run_dir}{summary}", file=sys.stderr)
    return 0
