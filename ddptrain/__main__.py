"""Entry point: ``torchrun --nproc_per_node=N -m ddptrain [--config F] [--a.b V ...]``.

Sets up logging, parses the config, initialises the process group, runs the trainer and
always tears the process group down. Exit status: see :class:`ddptrain.run_files.ExitCode`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from ddptrain import startup_signals

log = logging.getLogger("ddptrain")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("ddptrain")
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    package_logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    startup_signals.catch()  # before torch is imported (seconds): a stop then is kept
    from ddptrain import dist

    rank = dist.launched_rank()
    setup_logging(rank)
    from ddptrain.checkpoint import CheckpointError, SaveError
    from ddptrain.config import ConfigError, parse_config, validate_for_world
    from ddptrain.data import DataError
    from ddptrain.model import ModelError
    from ddptrain.run_files import ExitCode, write_status
    from ddptrain.storage import StorageError
    from ddptrain.trainer import Trainer

    try:
        cfg = parse_config(argv)  # argument errors exit with status 2 and the usage text
    except ConfigError as exc:  # cross-field rules (validate)
        if rank == 0:
            log.error("%s", exc)
        return int(ExitCode.BAD_INPUT)
    user_errors = (ConfigError, DataError, ModelError, StorageError, CheckpointError)
    trainer = None
    try:
        info = dist.init_distributed(cfg.train.device)
        validate_for_world(cfg, info.world_size)
        trainer = Trainer(cfg, info)
        return exit_status(trainer.run())
    except SaveError as exc:  # agreed by all ranks: a failure, not bad input
        if rank == 0:
            log.error("%s", exc)
            with contextlib.suppress(OSError):
                write_status(cfg.run.dir, "failed", message=str(exc)[:500])
        return int(ExitCode.FAILED)
    except user_errors as exc:
        if trainer is not None and rank == 0:  # logged, and kept in events.jsonl
            trainer.logger.event("bad_input", level=logging.ERROR, message=str(exc))
        elif rank == 0 or not isinstance(exc, (ConfigError, DataError, ModelError,
                                               StorageError)):
            log.error("%s", exc)
        if rank == 0:
            with contextlib.suppress(OSError):  # an unwritable run.dir is reported above
                write_status(cfg.run.dir, "bad_input", message=str(exc)[:500])
        return int(ExitCode.BAD_INPUT)
    except BaseException as exc:
        if rank == 0:
            with contextlib.suppress(OSError):
                write_status(cfg.run.dir, "failed",
                             message=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        if trainer is not None:
            trainer.close()
        dist.teardown()


def exit_status(code: int) -> int:
    """The process exit status for the trainer's result.

    Under torchrun (TORCHELASTIC_RUN_ID is set) a rank that stopped on request exits 0,
    not 75: the elastic agent restarts the group (--max-restarts) or tears the job down on
    any non-zero exit, and a requested stop must do neither. torchrun reduces worker
    failures to its own status 1 anyway, so scripts read <run.dir>/status.json.
    """
    from ddptrain.run_files import ExitCode

    if code == ExitCode.PREEMPTED and os.environ.get("TORCHELASTIC_RUN_ID"):
        return int(ExitCode.FINISHED)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
