"""The demo's step-time table: measured seconds per step kind, which ``nnUNetv2_vf_demo`` prints as its estimates.

Runs ``nnUNetv2_vf_demo --quick`` and the default demo (about 16 min on a quiet 2-core CPU) in temporary folders,
reads the ``timings.json`` each run writes, and rewrites ``nnunetv2_vf/demo_data/step_times.json`` (the table the
demo reads) and ``benchmarks/results/demo_step_times_cpu.json`` (the same with the machine's facts). Run it on a
quiet machine: the table is what the demo promises to a user.

    python benchmarks/demo_step_times.py                            # both demos, about 16 min
    python benchmarks/demo_step_times.py --from-output Q_DIR D_DIR   # finished demo folders (--quick, default)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _measure import code_version  # noqa: E402

TABLE = REPO / "nnunetv2_vf" / "demo_data" / "step_times.json"
RESULTS = REPO / "benchmarks" / "results" / "demo_step_times_cpu.json"


def run_demo(folder: Path, quick: bool) -> Path:
    from nnunetv2_vf.workflow import console_script
    out = folder / ("quick" if quick else "default")
    cmd = [console_script("nnUNetv2_vf_demo"), "-o", str(out), *(["--quick"] if quick else [])]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def read_timings(folder: Path, mode: str) -> dict:
    record = json.loads((Path(folder) / "timings.json").read_text())
    if record["mode"] != mode:
        raise SystemExit(f"{folder}/timings.json is from a {record['mode']} demo, expected {mode}")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-output", nargs=2, metavar=("QUICK_DIR", "DEFAULT_DIR"),
                   help="read finished demo output folders instead of running the demos")
    p.add_argument("--results", default=str(RESULTS), help="results file (default: %(default)s)")
    p.add_argument("--no-write-table", action="store_true",
                   help="write only the results file, keep the table the demo reads")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vf_demo_times_") as tmp:
        folders = [Path(f) for f in args.from_output] if args.from_output else \
            [run_demo(Path(tmp), quick=True), run_demo(Path(tmp), quick=False)]
        records = {mode: read_timings(f, mode) for mode, f in zip(("quick", "default"), folders)}
    table = json.loads(TABLE.read_text())
    date = time.strftime("%Y-%m-%d")
    table.update({mode: records[mode]["seconds"] for mode in records})
    table["source"] = (f"benchmarks/demo_step_times.py on {date}, commit {code_version(REPO)}, {os.cpu_count()} CPUs "
                       f"({platform.processor() or platform.machine()}), load average {load_before:.1f} before")
    result = {**table, "runs": records}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_write_table:
        TABLE.write_text(json.dumps(table, indent=1) + "\n")
    for mode, record in records.items():
        total = sum(s for _, s in record["steps"])
        print(f"{mode}: {total / 60:.1f} min in all; per step kind {record['seconds']}")
    print(f"wrote {results}" + ("" if args.no_write_table else f" and {TABLE}"))


if __name__ == "__main__":
    sys.exit(main())
