"""B1 (step time), B4 (training time with async saves) and B5 (time to first step on
resume): each launches ddptrain and its reference with torchrun, alternating which goes
first in every repetition so that drift on a shared machine hits both sides alike."""

from __future__ import annotations

import os
import shutil
import time

from bench.common import (
    Result,
    cpu_steal_seconds,
    Size,
    ddptrain,
    events,
    median,
    read_jsonl,
    step_times,
    torchrun,
)


def _order(rep: int, sides: tuple[str, ...]) -> tuple[str, ...]:
    """The sides of repetition ``rep``, rotated so that each goes first in turn."""
    shift = rep % len(sides)
    return sides[shift:] + sides[:shift]


def b1_step_time(size: Size, work: str) -> Result:
    """Median step time of ddptrain (checkpoints off) vs a hand-written DDP loop."""
    runs: dict[str, list[float]] = {"ddptrain": [], "plain": []}
    for rep in range(size.reps):
        for side in _order(rep, ("ddptrain", "plain")):
            run_dir = os.path.join(work, "b1", f"{side}-{rep}")
            if side == "ddptrain":
                ddptrain(run_dir, size, "--train.max_steps", str(size.b1_steps),
                         "--log.every_steps", "1", "--ckpt.every_steps", "0")
                rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                        if r["kind"] == "train"]
            else:
                out = run_dir + ".jsonl"
                torchrun(["bench/plain_ddp.py", "--model", size.model, "--image_size",
                          str(size.image_size), "--global_batch_size",
                          str(size.global_batch_size), "--steps", str(size.b1_steps),
                          "--out", out], log_path=run_dir + ".log")
                rows = read_jsonl(out)
            runs[side].append(median(step_times(rows)))
    return Result("B1", "step time, checkpoints off", "ddptrain",
                  "hand-written DDP loop (same model, data, batch, seed, torchrun)",
                  subject_value=median(runs["ddptrain"]),
                  reference_value=median(runs["plain"]), goal="<= 1.02",
                  notes=f"median over {size.reps} runs of each run's median step time "
                        f"(steps 6-{size.b1_steps}, every step logged on both sides)",
                  samples=runs)


def b4_async_training_time(size: Size, work: str, step_s: float) -> list[Result]:
    """Training time with an async save about every ``b4_save_every_s`` (thread, and
    process as B4p) vs no checkpoints.

    Training time = first step starts -> training complete, minus the final (synchronous)
    save, which all sides write; waiting for the last async save is counted.
    """
    every = max(1, round(size.b4_save_every_s / step_s))
    steps = max(every + 1, round(size.b4_run_s / step_s))
    runs: dict[str, list[float]] = {"thread": [], "process": [], "none": []}
    stalls: dict[str, list[float]] = {"thread": [], "process": []}
    steal: dict[str, list[float]] = {"thread": [], "process": [], "none": []}
    windowed: dict[str, list[list[float]]] = {"thread": [], "process": []}
    for rep in range(size.b4_reps):
        for side in _order(rep, ("thread", "process", "none")):
            run_dir = os.path.join(work, "b4", f"{side}-{rep}")
            ckpt = (["--ckpt.async_mode", side, "--ckpt.every_steps", str(every),
                     "--ckpt.keep_last", "2"] if side != "none"
                    else ["--ckpt.every_steps", "0"])
            steal_before = cpu_steal_seconds()
            ddptrain(run_dir, size, "--train.max_steps", str(steps), "--log.every_steps",
                     "1", *ckpt)
            steal_after = cpu_steal_seconds()
            if steal_before is not None and steal_after is not None:
                steal[side].append(round(steal_after - steal_before, 2))
            runs[side].append(_training_seconds(run_dir))
            if side != "none":
                commits = events(run_dir, "checkpoint_committed")
                stalls[side] += [e["stall_s"] for e in commits
                                 if e.get("stall_s") is not None]
                windowed[side].append(save_costs(run_dir))
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    spread = max(runs["none"]) / min(runs["none"])
    direct = [Result("B4" if mode == "thread" else "B4p",
                   f"total training time, async ({mode}) saves about once a minute",
                   f"ddptrain, {mode} async save every {every} steps",
                   "the same run without checkpoints", subject_value=median(runs[mode]),
                   reference_value=median(runs["none"]), goal="<= 1.01",
                   notes=f"{steps} steps (~{size.b4_run_s:.0f} s at {step_s:.3f} s/step), "
                         f"per-repetition ratios {_ratios(runs[mode], runs['none'])}, "
                         f"{len(stalls[mode]) // size.b4_reps} saves per run, median stall "
                         f"(manager call + staging fence) {median(stalls[mode]):.4f} s"
                         f"{_steal_note(steal, mode)}; the runs without checkpoints "
                         f"alone differ by {100 * (spread - 1):.1f}% (slowest/fastest)",
                   samples={mode: runs[mode], "none": runs["none"],
                            "stall_s": stalls[mode], f"cpu_steal_s_{mode}": steal[mode],
                            "cpu_steal_s_none": steal["none"]})
              for mode in ("thread", "process")]
    return direct + [_windowed_result(mode, runs[mode], windowed[mode], every)
                     for mode in ("thread", "process")]


def save_costs(run_dir: str, context: int = 20) -> list[float]:
    """Seconds each async save of a run added to its training, measured against the
    steps around it in the same run (every step logged).

    A save's *window* is the steps that ran while it was in flight: from the step after
    the save call (whose time includes the call and the staging fence) up to the step
    during which it was committed. Its *baseline* is the median step time of the
    ``context`` steps before and after the window (outside any window). Cost = sum over
    the window of (step time - baseline). Drift of the machine's speed over minutes,
    which decides the direct B4 comparison between whole runs, cancels here; what the
    copy and write take from training (shared cores, memory bandwidth, GIL) does not.
    """
    rows = sorted((r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                   if r["kind"] == "train"), key=lambda r: r["step"])
    ended = {r["step"]: r["time"] for r in rows}
    seconds = {s: ended[s] - ended[s - 1] for s in ended if s - 1 in ended}
    commits = {e["step"]: e["time"] for e in events(run_dir, "checkpoint_committed")
               if e["mode"] != "sync"}
    windows = {step: [s for s in seconds if s > step and (s == step + 1
                                                         or ended[s - 1] < committed)]
               for step, committed in commits.items()}
    in_windows = {s for window in windows.values() for s in window}
    costs = []
    for step, window in sorted(windows.items()):
        around = [s for s in seconds if s not in in_windows
                  and (step - context < s <= step or max(window) < s <= max(window)
                       + context)]
        baseline = median([seconds[s] for s in around])
        costs.append(sum(seconds[s] - baseline for s in window))
    return costs


def _windowed_result(mode: str, totals: list[float], costs: list[list[float]],
                     every: int) -> Result:
    """B4w/B4wp: each B4 run's training time over that time minus its saves' costs."""
    without = [total - sum(run) for total, run in zip(totals, costs)]
    per_save = [c for run in costs for c in run]
    return Result("B4w" if mode == "thread" else "B4wp",
                  f"total training time, async ({mode}) saves about once a minute, "
                  "within-run baseline",
                  f"the B4{'' if mode == 'thread' else 'p'} runs",
                  "the same runs minus what their saves cost (against the steps around "
                  "each save)", subject_value=median(totals), reference_value=median(without),
                  goal="<= 1.01",
                  notes=f"save every {every} steps, {len(per_save)} saves; cost per save "
                        f"median {median(per_save):.3f} s (first save of each run: "
                        f"{_join([run[0] for run in costs if run], 2)} s; later ones: "
                        f"{_join([c for run in costs for c in run[1:]], 2)} s); "
                        f"per-run ratios {_ratios(totals, without)}",
                  samples={"save_costs_s": costs, "totals_s": totals, "without_s": without})


def _steal_note(steal: dict[str, list[float]], mode: str) -> str:
    if not steal[mode]:
        return ""
    return (f", CPU time stolen by the hypervisor per run {_join(steal[mode])} s "
            f"(without checkpoints: {_join(steal['none'])} s)")


def _join(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _ratios(subject: list[float], reference: list[float]) -> str:
    return ", ".join(f"{a / b:.3f}" for a, b in zip(subject, reference))


def _training_seconds(run_dir: str) -> float:
    first = events(run_dir, "first_step")[0]["time"]
    done = events(run_dir, "training_complete")[-1]["time"]
    final = [e for e in events(run_dir, "checkpoint_committed") if e["reason"] == "final"]
    return done - first - final[-1]["seconds"]


def b5_resume_first_step(size: Size, work: str) -> Result:
    """Process start -> first step when resuming vs a cold start plus a raw read of the
    checkpoint's bytes."""
    run_dir = os.path.join(work, "b5", "resume")
    ddptrain(run_dir, size, "--train.max_steps", "1", "--ckpt.keep_last", "1")
    runs: dict[str, list[float]] = {"resume": [], "cold": [], "raw_read": []}
    for rep in range(size.reps):
        for side in _order(rep, ("resume", "cold")):
            if side == "resume":
                ddptrain(run_dir, size, "--train.max_steps", str(rep + 2),
                         "--ckpt.keep_last", "1")
                resumed = events(run_dir, "resumed")[-1]["step"]
                assert resumed == rep + 1, f"B5 resumed from step {resumed}"
                runs["resume"].append(events(run_dir, "first_step")[-1]
                                      ["since_process_start_s"])
                runs["raw_read"].append(_raw_read_seconds(run_dir))
            else:
                cold = os.path.join(work, "b5", f"cold-{rep}")
                ddptrain(cold, size, "--train.max_steps", "1")
                runs["cold"].append(events(cold, "first_step")[-1]["since_process_start_s"])
                shutil.rmtree(cold)
    reference = median(runs["cold"]) + median(runs["raw_read"])
    return Result("B5", "process start -> first step, resuming",
                  "ddptrain resuming (2 ranks)", "cold start + raw read of the checkpoint",
                  subject_value=median(runs["resume"]), reference_value=reference,
                  goal="<= 1.2",
                  notes=f"cold start {median(runs['cold']):.2f} s + raw read "
                        f"{median(runs['raw_read']):.3f} s (page cache as left by the run)",
                  samples=runs)


def _raw_read_seconds(run_dir: str) -> float:
    """Read every file of the newest checkpoint once, sequentially, in 16 MiB reads.

    That is the one the resumed run just wrote (retention removed the one it loaded,
    which had the same files and sizes); both were written moments before being read,
    so the resume and this read see the same page-cache state.
    """
    ckpts = os.path.join(run_dir, "checkpoints")
    path = os.path.join(ckpts, max(n for n in os.listdir(ckpts) if n.startswith("step-")))
    started = time.perf_counter()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - started
