#!/usr/bin/env python3
"""The capacity plan's model (docs/capacity.md), checkable: a discrete-event simulation of the
pipeline as five stages of replicas in series, fed a back-scan backlog and a live trickle, with
per-radiograph service times taken from measurements (scripts/load.sh) or stated assumptions.

Each stage is `replicas` servers sharing one queue per lane; a free replica takes a live
radiograph before a back-scan one when priority is on (the `[lanes] live_first` rule), and the
radiograph it is working on is never interrupted. Service times are exponential around the
given mean (coefficient of variation 1, pessimistic for batched stages). Batching, bus and store
latency are left out: at the rates planned here they are milliseconds against seconds of queueing.

    scripts/capacity.py --backlog 1000000 --live-per-hour 300 \\
        --stage ingest:0.004:1 --stage preprocess:0.060:8 --stage ensemble:0.070:6 ...

prints the back-scan's makespan, each stage's utilisation, the bottleneck and the live
latency (p50/p99) with and without priority. Standard library only.
"""

import argparse
import collections
import heapq
import random
import statistics


def simulate(stages, backlog, live_rate, priority, seed, live_window):
    """stages: [(name, mean_s, replicas)]; live_rate: radiographs/s; returns a dict."""
    rng = random.Random(seed)
    # Events: (time, seq, kind, payload)
    events = []
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    queues = [{"live": collections.deque(), "backscan": collections.deque()} for _ in stages]
    free = [r for (_, _, r) in stages]
    busy_time = [0.0] * len(stages)
    start = {}
    live_lat = []
    done_backscan = 0
    makespan = None
    # The back-scan is all queued at once at the first stage; live arrivals are Poisson over
    # `live_window` seconds (the back-scan's expected length unless given).
    for i in range(backlog):
        queues[0]["backscan"].append(("b", i))
        start[("b", i)] = 0.0
    t, n = 0.0, 0
    while live_rate > 0:
        t += rng.expovariate(live_rate)
        if t > live_window:
            break
        push(t, "arrive", ("l", n))
        n += 1

    def dispatch(now, k):
        name, mean, _ = stages[k]
        while free[k] > 0:
            q = queues[k]
            if q["live"]:
                item = q["live"].popleft()
            elif q["backscan"]:
                item = q["backscan"].popleft()
            else:
                return
            free[k] -= 1
            dt = rng.expovariate(1.0 / mean) if mean > 0 else 0.0
            busy_time[k] += dt
            push(now + dt, "done", (k, item))

    def enqueue(now, k, item):
        # Without priority there is one queue in arrival order: a live radiograph waits behind
        # everything queued before it. Except at ingest: live radiographs come in through their
        # own door (C-STORE, STOW-RS), not the folder or DICOMweb walk of the back-scan.
        lane = "live" if item[0] == "l" and (priority or k == 0) else "backscan"
        queues[k][lane].append(item)
        dispatch(now, k)

    dispatch(0.0, 0)
    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            start[payload] = now
            enqueue(now, 0, payload)
        else:
            k, item = payload
            free[k] += 1
            if k + 1 < len(stages):
                enqueue(now, k + 1, item)
            else:
                if item[0] == "l":
                    live_lat.append(now - start.pop(item))
                else:
                    done_backscan += 1
                    start.pop(item, None)
                    if done_backscan == backlog:
                        makespan = now
            dispatch(now, k)
    live_lat.sort()

    def pct(q):
        return live_lat[min(len(live_lat) - 1, int(q * len(live_lat)))] if live_lat else float("nan")

    span = now
    return {
        "makespan_s": makespan,
        "utilisation": [busy_time[k] / (span * stages[k][2]) for k in range(len(stages))],
        "span_s": span,
        "live_n": len(live_lat),
        "live_p50_s": pct(0.5),
        "live_p99_s": pct(0.99),
        "live_mean_s": statistics.fmean(live_lat) if live_lat else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", action="append", required=True,
                    help="NAME:MEAN_SECONDS_PER_RADIOGRAPH:REPLICAS, in pipeline order")
    ap.add_argument("--backlog", type=int, default=100000, help="back-scan radiographs queued at t=0")
    ap.add_argument("--live-per-hour", type=float, default=0.0, help="live radiographs per hour")
    ap.add_argument("--seed", type=int, default=2020)
    args = ap.parse_args()
    stages = []
    for s in args.stage:
        name, mean, reps = s.split(":")
        stages.append((name, float(mean), int(reps)))
    # The ceiling: the stage with the least replicas per second of service.
    rates = [(r / m if m > 0 else float("inf"), n) for (n, m, r) in stages]
    ceiling, bottleneck = min(rates)
    window = args.backlog / ceiling if args.backlog else 3600.0
    print(f"stages: " + ", ".join(f"{n} {m * 1e3:.1f} ms x{r}" for (n, m, r) in stages))
    print(f"ceiling {ceiling:.1f} radiographs/s, set by {bottleneck}; "
          f"back-scan of {args.backlog} at the ceiling: {args.backlog / ceiling / 3600:.2f} h")
    for priority in (True, False):
        r = simulate(stages, args.backlog, args.live_per_hour / 3600.0, priority, args.seed, window)
        ms = r["makespan_s"]
        print(f"\npriority {'on ' if priority else 'off'}: back-scan done in "
              f"{ms / 3600:.2f} h" if ms else "\nno back-scan")
        print("  utilisation: " + ", ".join(
            f"{stages[k][0]} {u * 100:.0f}%" for k, u in enumerate(r["utilisation"])))
        if r["live_n"]:
            print(f"  live ({r['live_n']} radiographs): p50 {r['live_p50_s']:.2f} s, "
                  f"p99 {r['live_p99_s']:.2f} s, mean {r['live_mean_s']:.2f} s")


if __name__ == "__main__":
    main()
