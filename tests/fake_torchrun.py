#!/usr/bin/env python3
"""Stands in for ``python -m torch.distributed.run ... -m ddptrain ... --run.dir D`` in the
supervisor tests: each start takes the next word of $FAKE_PLAN and acts it out.

finished | preempted | bad_input: write that state and exit (1 unless finished: torchrun
collapses worker failures to 1). crash: leave state running, exit 1. wait: write
running, wait for a signal, note every signal received within 0.5 s, write preempted.
``FAKE -c CODE ...`` (the supervisor's check of ddptrain's arguments) just succeeds.
"""

import json
import os
import signal
import sys
import time

if sys.argv[1] == "-c":  # the supervisor's argument check: these tests' arguments pass
    sys.exit(0)
run_dir = sys.argv[sys.argv.index("--run.dir") + 1]
with open(os.environ["FAKE_PLAN"]) as f:
    plan = f.read().split()
with open(os.environ["FAKE_PLAN"], "w") as f:
    f.write(" ".join(plan[1:]))
log = open(os.environ["FAKE_LOG"], "a")
log.write(f"start {plan[0]} {' '.join(sys.argv[1:])}\n")
log.flush()


def write(state: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "status.json"), "w") as f:
        json.dump({"state": state}, f)


got = []
if plan[0] == "wait":
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, lambda signum, _: got.append(signal.Signals(signum).name))
    write("running")
    while not got:
        time.sleep(0.01)
    time.sleep(0.5)
    log.write(f"signals {' '.join(got)}\n")
    write("preempted")
    sys.exit(1)
write("running" if plan[0] == "crash" else plan[0])
sys.exit(0 if plan[0] == "finished" else 1)
