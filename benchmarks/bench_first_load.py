"""The first load of a model folder (its weights verified: every tensor's CRC32C) beside a load
that the folder's stamp lets skip the check, and the check alone.

    python benchmarks/bench_first_load.py FOLDER [--runs 5]

FOLDER (a model in OpenAI's layout, e.g. one bench_generate.make_model wrote) is copied to a
temporary folder first, so its own stamp is left alone. Each figure is `picogpt.load` (or
`tf_checkpoint.verify`) timed in a fresh process, with the page cache warm; best and median of
--runs, the cases taking turns.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "verify (every CRC32C)": "from picogpt.formats import tf_checkpoint; "
                             "f = lambda: tf_checkpoint.verify(F)",
    "load (stamped)": "import picogpt; from picogpt.hub import verify; verify.verify_once(F); "
                      "f = lambda: picogpt.load(F)",
    "first load (verifies)": "import picogpt; from picogpt.hub import verify; "
                             "verify.stamp_path(F).unlink(missing_ok=True); "
                             "f = lambda: picogpt.load(F)",
}
TIMED = ("import time; F = {folder!r}\n{setup}\n"
         "start = time.perf_counter(); f(); print(time.perf_counter() - start)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model folder (it is copied; left as it is)")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs of each kind of load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(args.folder, folder, ignore=shutil.ignore_patterns(".picogpt-verified"))
        times = {name: [] for name in CASES}
        for _ in range(args.runs):
            for name, setup in CASES.items():
                out = subprocess.run([sys.executable, "-c", TIMED.format(folder=str(folder),
                                                                         setup=setup)],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                times[name].append(float(out.stdout.split()[-1]))
    for name, ts in times.items():
        print(f"{name:24s} best {min(ts):.2f} s, median {statistics.median(ts):.2f} s")


if __name__ == "__main__":
    main()
