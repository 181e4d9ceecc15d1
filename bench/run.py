"""Run the ddptrain benchmark suite: ``python -m bench.run [--size quick|full]``.

Every benchmark runs its subject and its reference side by side in one run, repeats
them, and reports medians and the ratio subject / reference. Results go to
``<out_dir>/<stem>.md`` and ``.json``. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import time

import torch

from bench import report, saving, training
from bench.common import SIZES, Result

log = logging.getLogger("bench")
ALL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick",
                        help="quick: fewer repetitions and a 150 s B4 run; full: more "
                             "repetitions and a 600 s B4 run (see bench/README.md)")
    parser.add_argument("--only", nargs="+", choices=ALL, default=list(ALL),
                        help="run only these benchmarks")
    parser.add_argument("--out_dir", default=os.path.join("bench", "results"))
    parser.add_argument("--stem", default=None,
                        help="results file name without extension (default: the size)")
    parser.add_argument("--work_dir", default=os.path.join("runs", "bench"),
                        help="scratch directory for runs and checkpoints (emptied first)")
    parser.add_argument("--reps", type=int, default=None,
                        help="override the size's repetitions (B1, B5)")
    parser.add_argument("--b4_reps", type=int, default=None,
                        help="override the size's B4 repetitions (3 runs each)")
    parser.add_argument("--step_s", type=float, default=None,
                        help="B4's step time when B1 is not run (default: measured)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    size = SIZES[args.size]
    if args.reps:
        size = dataclasses.replace(size, reps=args.reps)
    if args.b4_reps:
        size = dataclasses.replace(size, b4_reps=args.b4_reps)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    started = time.monotonic()
    load_before = os.getloadavg()
    results: list[Result] = []
    knobs: list[dict] = []
    state_bytes = None

    if "B1" in args.only:
        log.info("B1: step time, ddptrain vs plain DDP (%d x 2 runs)", size.reps)
        results.append(training.b1_step_time(size, args.work_dir))
    if {"B2", "B3", "B6"} & set(args.only):
        log.info("B2/B3/B6 + knobs: one checkpoint job (%d repetitions)", size.ckpt_reps)
        data = saving.run_ckpt_worker(size, args.work_dir)
        state_bytes = data["bytes"]
        results += [r for r in saving.checkpoint_results(data, size.ckpt_reps)
                    if r.key.rstrip("p") in args.only]
        if "B4" in args.only:
            results += saving.b4_derived(data, size.b4_save_every_s)
        knobs = saving.knob_rows(data)
    if "B4" in args.only:
        step_s = args.step_s or _measured_step_time(results)
        log.info("B4: training time with async saves (%d x 3 runs of ~%.0f s)",
                 size.b4_reps, size.b4_run_s)
        results += training.b4_async_training_time(size, args.work_dir, step_s)
    if "B5" in args.only:
        log.info("B5: time to first step when resuming (%d x 2 runs)", size.reps)
        results.append(training.b5_resume_first_step(size, args.work_dir))
    if "B7" in args.only:
        log.info("B7: save to a local SeaweedFS vs raw s3fs upload (%d repetitions)",
                 size.reps * 2)
        results.append(saving.b7_s3_save(args.work_dir, size.reps * 2))

    results.sort(key=lambda r: r.key)
    meta = {"size": size.name, "when": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "torch": torch.__version__, "model": size.model, "nproc": 2,
            "state_mb": round(state_bytes / 1e6) if state_bytes else "?",
            "minutes": (time.monotonic() - started) / 60,
            "load_avg_before_after": [round(load_before[1], 1),
                                      round(os.getloadavg()[1], 1)],
            "size_config": dataclasses.asdict(size), "only": args.only}
    paths = report.write(results, knobs, meta, args.out_dir, args.stem or size.name)
    print(report.markdown(results, knobs, meta))
    log.info("wrote %s and %s", *paths)
    return 0


def _measured_step_time(results: list[Result]) -> float:
    for r in results:
        if r.key == "B1":
            return r.subject_value
    raise SystemExit("B4 needs a step time: run it together with B1 or pass --step_s")


if __name__ == "__main__":
    raise SystemExit(main())
