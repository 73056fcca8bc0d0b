#!/usr/bin/env python3
"""Print the Markdown table of scripts/bench-deid.sh from its results.tsv.

Usage: report.py RESULTS_TSV IN_FILES IN_BYTES MAX_FILE_BYTES

RESULTS_TSV rows: tool, best wall seconds, peak RSS KiB, exit status, output .dcm files, command.
"""

import sys


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    path, in_files, in_bytes, max_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rows = {}
    order = []
    with open(path) as f:
        for line in f:
            tool, wall, rss, rc, files, cmd = line.rstrip("\n").split("\t")
            wall = float(wall)
            rows[tool] = dict(
                wall=wall,
                fps=in_files / wall,
                mbps=in_bytes / 1e6 / wall,
                rss=int(rss) * 1024,
                rc=int(rc),
                files=int(files),
                cmd=cmd,
            )
            order.append(tool)

    print("| tool | wall (s) | files/s | MB/s | peak RSS (MB) | exit | .dcm out |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in order:
        r = rows[t]
        print(
            f"| {t} | {r['wall']:.2f} | {r['fps']:.1f} | {r['mbps']:.0f} | "
            f"{r['rss'] / 1e6:.0f} | {r['rc']} | {r['files']} |"
        )
    print()
    # Like with like: the durable export against the floor and the peer followed by a sync, the
    # export without its sync against the floor and the peer as they are.
    pairs = [("fracture", "gdcmanon+sync", "cp+sync"), ("fracture-nosync", "gdcmanon", "cp")]
    ours_rss = max((rows[o]["rss"] for o, _, _ in pairs if o in rows), default=None)
    if ours_rss is not None:
        print("| check | value | target | met |")
        print("| --- | ---: | ---: | --- |")
        for o, peer, floor in pairs:
            if o not in rows:
                continue
            if peer in rows:
                x = rows[o]["fps"] / rows[peer]["fps"]
                print(f"| files/s {o} / {peer} | {x:.2f}x | >= 2x | {'yes' if x >= 2 else 'NO'} |")
            if floor in rows:
                x = rows[o]["mbps"] / rows[floor]["mbps"]
                print(f"| MB/s {o} / {floor} | {x:.0%} | >= 60% | {'yes' if x >= 0.6 else 'NO'} |")
        x = ours_rss / max_file
        print(f"| peak RSS / largest file ({max_file / 1e6:.1f} MB) | {x:.2f}x | < 4x | {'yes' if x < 4 else 'NO'} |")
        print()
    print("Commands:")
    print()
    for t in order:
        print(f"- {t}: `{rows[t]['cmd']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
