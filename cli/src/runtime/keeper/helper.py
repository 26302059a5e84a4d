# dask-spank keeper helper: the part of a cluster's keeper that must be a
# dask client of its scheduler, and nothing else. The scheduler job's
# `dask-spank attach` (the job-side runtime, in Rust) writes this file into
# the cluster's directory, runs it with the job's own Python (the one that
# runs the scheduler, so it has distributed), watches it and starts it again
# if it dies. Every decision (how many workers, which to retire, successors,
# submissions) is the runtime's; so is every rule and every file name.
#
# It speaks JSON lines. On stdin, from the runtime:
#   {"connect": {"address": A, "ca": PATH, "cert": PATH, "key": PATH}}
#       (TLS paths null for a plain TCP cluster): whom to talk to.
#   {"retire": [ADDRESS, ...]}: retire these workers through dask (their
#       data moves to the others first), then report {"retired": [...]}.
#   {"remove": [ADDRESS, ...]}: remove these workers from the scheduler now
#       (their jobs ended; they do not answer): dask recomputes their data.
# On stdout, every TICK seconds once connected:
#   {"state": {"workers": {NAME: {"address": A, "keys": N}}, "adaptive_target": N,
#              "restricted": N, "resources": {RESOURCE: AMOUNT}, "threads": N}}
#   (restricted: the tasks asking for worker resources, processing on a worker
#   or waiting for one; resources: what they ask, summed; threads: the
#   workers' threads), for the runtime to size each pool.
# and {"error": TEXT} when a step failed (it goes on). Its stderr is the
# scheduler job's log.
import json
import queue
import sys
import threading
import time

TICK = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0


def say(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def orders(q):
    """Read the runtime's lines into q; None at its end (it is gone)."""
    for line in sys.stdin:
        try:
            q.put(json.loads(line))
        except ValueError:
            say({"error": f"bad order: {line.strip()[:200]}"})
    q.put(None)


def connect(c):
    from distributed import Client
    from distributed.security import Security
    patch_distributed()  # noqa: F821 - defined before this file: python/dask_spank/tls_eof.py
    sec = Security()
    if c.get("cert"):
        sec = Security(tls_ca_file=c["ca"], tls_client_cert=c["cert"], tls_client_key=c["key"],
                       require_encryption=True)
    # Its name tells the scheduler's idle check that this client is the
    # cluster's own (KEEPER_CLIENT in python/dask_spank/boot.py).
    return Client(c["address"], security=sec, timeout=10, name="dask-spank-keeper")


def state(client):
    info = client.scheduler_info(n_workers=-1)["workers"]
    workers = {w.get("name"): {"address": a, "keys": w.get("metrics", {}).get("task_counts", {}).get("memory", 0)}
               for a, w in info.items() if isinstance(w.get("name"), str)}
    return {"workers": workers, **client.run_on_scheduler(demand)}


def demand(dask_scheduler):
    """On the scheduler: dask's adaptive target, and what the tasks that ask
    for worker resources ask. Only tasks that can run now count, as in
    dask's target: those processing on a worker and those no worker can
    take (a task with resources is never queued, see is_rootish): tasks
    ready to run, not every task of the graph."""
    restricted, amounts = 0, {}
    tasks = [*dask_scheduler.unrunnable]
    for ws in dask_scheduler.workers.values():
        tasks.extend(ws.processing)
    for ts in tasks:
        if ts.resource_restrictions:
            restricted += 1
            for r, a in ts.resource_restrictions.items():
                amounts[r] = amounts.get(r, 0) + float(a)
    return {"adaptive_target": int(dask_scheduler.adaptive_target()), "restricted": restricted,
            "resources": amounts, "threads": sum(ws.nthreads for ws in dask_scheduler.workers.values())}


async def remove_lost(dask_scheduler, addresses):
    """On the scheduler: forget workers that are gone without a word."""
    for a in addresses:
        if a in dask_scheduler.workers:
            await dask_scheduler.remove_worker(a, stimulus_id=f"dask-spank-lost-job-{time.time()}", close=False)


def main():
    q = queue.Queue()
    threading.Thread(target=orders, args=(q,), daemon=True).start()
    client, target = None, None
    while True:
        try:
            order = q.get(timeout=TICK)
        except queue.Empty:
            order = {}
        if order is None:
            return
        try:
            if "connect" in order and order["connect"] != target:
                if client is not None:
                    client.close()
                client, target = None, order["connect"]
            if client is None and target is not None:
                client = connect(target)
            if client is not None and order.get("remove"):
                client.run_on_scheduler(remove_lost, addresses=order["remove"])
            if client is not None and order.get("retire"):
                client.retire_workers(workers=order["retire"], close_workers=True)
                say({"retired": order["retire"]})
            if client is not None:
                say({"state": state(client)})
        except Exception as e:  # noqa: BLE001 - reported; the runtime decides
            say({"error": f"{type(e).__name__}: {e}"})
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass
            client = None


main()
