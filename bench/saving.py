"""B2 (sync save throughput), B3 (async stall), B6 (stall vs single-file torch.save), the
knob sweep, and B7 (S3 save). B2/B3/B6 and the knobs come from one torchrun job of
bench/ckpt_worker.py, which interleaves every subject with its reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import Result, Size, median, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KNOBS = {
    "dcp_default": "direct dcp.save, ddptrain's writer settings (1 thread, fsync, "
                   "one file per rank)",
    "threads_2": "thread_count=2",
    "threads_4": "thread_count=4",
    "file_per_tensor": "single_file_per_rank=False",
    "no_fsync": "sync_files=False (not durable; for comparison only)",
    "plan_cache": "DefaultSavePlanner(enable_plan_caching=True)",
    "no_crc32": "set_crc32_options(False): no zip CRC-32s (torch.load never checks them)",
    "threads_4_plan_cache": "thread_count=4 and plan caching together",
}


def run_ckpt_worker(size: Size, work: str) -> dict:
    out = os.path.join(work, "ckpt", "result.json")
    torchrun(["bench/ckpt_worker.py", "--out", out, "--work_dir",
              os.path.join(work, "ckpt"), "--reps", str(size.ckpt_reps),
              *size.ddptrain_args()], log_path=os.path.join(work, "ckpt.log"))
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def _seconds(data: dict, name: str) -> float:
    return median(data["variants"][name]["seconds"])


def checkpoint_results(data: dict, reps: int) -> list[Result]:
    size_mb = data["bytes"] / 1e6
    sync, raw = _seconds(data, "sync"), _seconds(data, "raw")
    samples = {name: row["seconds"] for name, row in data["variants"].items()}
    note = f"{size_mb:.0f} MB of state, median of {reps} interleaved repetitions"
    results = [Result(
        "B2", "sync save throughput", "ddptrain sync save (DCP, fsync, manifest)",
        "raw write + fsync of the same bytes per rank, same disk", unit="MB/s",
        subject_value=size_mb / sync, reference_value=size_mb / raw, goal=">= 0.8",
        notes=f"{note}; sync save {sync:.3f} s, raw write {raw:.3f} s",
        samples={"sync": samples["sync"], "raw": samples["raw"]})]
    for mode in ("thread", "process"):
        row = data["variants"][mode]
        results.append(Result(
            "B3" if mode == "thread" else "B3p", f"training stall per async save ({mode})",
            f"ddptrain async save, {mode}", "sync save of the same state",
            subject_value=_seconds(data, mode), reference_value=sync, goal="<= 0.04",
            notes=f"{note}; committed {median(row['during_s']):.2f} s after the call "
                  f"({median(row['steps_during']):.0f} steps trained meanwhile)",
            samples={mode: samples[mode], "sync": samples["sync"]}))
    best = min(("thread", "process"), key=lambda m: _seconds(data, m))
    results.append(Result(
        "B6", "stall per checkpoint vs single-file recipe", f"ddptrain async ({best})",
        "rank 0 torch.save(model+optimizer), others wait (no fsync)",
        subject_value=_seconds(data, best), reference_value=_seconds(data, "torch_save"),
        goal="<= 0.1", notes=note,
        samples={best: samples[best], "torch_save": samples["torch_save"]}))
    return results


def b4_derived(data: dict, interval_s: float) -> list[Result]:
    """B4 from the checkpoint job: the training time of ``interval_s`` with one async save
    in it, from the stall plus the extra time of the steps that ran while it was written
    (measured against as many steps without a save, interleaved in the same process)."""
    results = []
    for mode in ("thread", "process"):
        row = data["variants"][mode]
        cost = [s + e for s, e in zip(row["seconds"], row["extra_s"])]
        results.append(Result(
            "B4d" if mode == "thread" else "B4dp",
            f"training time of {interval_s:.0f} s with one async ({mode}) save, derived",
            f"{interval_s:.0f} s + stall + extra step time while saving",
            f"{interval_s:.0f} s of training without a save",
            subject_value=interval_s + median(cost), reference_value=interval_s,
            goal="<= 1.01",
            notes=f"cost per save {median(cost):.3f} s (stall {_seconds(data, mode):.4f} s "
                  f"+ {median(row['extra_s']):.3f} s slower steps over "
                  f"{median(row['steps_during']):.0f} steps)",
            samples={"cost_s": cost, "extra_s": row["extra_s"]}))
    return results


def knob_rows(data: dict) -> list[dict]:
    """The knob sweep: median seconds and throughput of each variant."""
    size_mb = data["bytes"] / 1e6
    base = _seconds(data, "dcp_default")
    rows = []
    for name, what in KNOBS.items():
        seconds = _seconds(data, name)
        rows.append({"knob": name, "what": what, "seconds": seconds,
                     "mb_per_s": size_mb / seconds, "vs_default": seconds / base})
    async_variants = (
        ("thread", "async thread, cached staging (ddptrain default)"),
        ("thread_nocache", "async thread, ckpt.cache_staging=false"),
        ("process", "async process, the state in one cached shared buffer (default)"),
        ("process_per_tensor", "async process, DCP's stager: a shared segment per tensor"))
    for name, what in async_variants:
        seconds = _seconds(data, name)
        rows.append({"knob": name, "what": f"{what}: stall", "seconds": seconds,
                     "mb_per_s": None, "vs_default": seconds / base})
    for name, what in async_variants:  # what the loop loses: stall + slower steps
        row = data["variants"][name]
        cost = median([s + e for s, e in zip(row["seconds"], row["extra_s"])])
        rows.append({"knob": f"{name} (cost)", "what": f"{what}: cost per save (stall + "
                     "slower steps while writing)", "seconds": cost, "mb_per_s": None,
                     "vs_default": cost / base})
    return rows


def b7_s3_save(work: str, reps: int) -> Result:
    """B7: ddptrain's DCP save to a private SeaweedFS on 127.0.0.1 vs a raw s3fs upload of
    the same bytes to the same server (bench/s3_save.py, default part size and threads)."""
    out = os.path.join(work, "s3_save")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "s3_save.py"), "--out", out,
           "--reps", str(reps)]
    with open(os.path.join(work, "s3_save.log"), "w", encoding="utf-8") as log_file:
        subprocess.run(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, check=True)
    with open(out + ".json", encoding="utf-8") as f:
        data = json.load(f)
    row = data["results"][0]  # the default configuration
    mb = row["bytes"] / 1e6
    return Result("B7", "save to the local S3 server", "ddptrain save to s3:// (DCP, commit)",
                  "raw s3fs upload of the same bytes (one object per rank file)",
                  unit="MB/s", subject_value=mb / row["ddptrain median s"],
                  reference_value=mb / row["raw pipe median s"], goal=">= 0.8",
                  notes=f"{mb:.0f} MB, {row['block_size_mb']} MiB parts, "
                        f"{row['thread_count']} threads, median of {reps} interleaved "
                        f"repetitions; {data['meta']['server']}; client and server share "
                        "the CPUs",
                  samples={"runs": row["runs"]})
