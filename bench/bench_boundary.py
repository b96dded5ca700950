"""Cost of hostile-but-valid audio at the API boundary: odd sample rates and a FLAC "bomb".

Run: ``python -m bench.bench_boundary [--code-root DIR] [--cap-gb 6]``. Not a test.

Each case runs in a fresh Python process (so peak RSS is the case's own) with its address space
capped at ``--cap-gb`` GiB beyond what the imports took, so an unbounded path fails with an
allocation error instead of taking the machine down. ``--code-root`` points at another checkout
(e.g. the main branch) to measure the code there with the same cases:

* ``resample <rate>``: a 0.5 s clip at ``rate`` through the three resamples a request makes
  (to 16 kHz with the tokenizer's float64 kernel, to 24 kHz and 16 kHz with the vocoder
  frontend's float32 kernel);
* ``flac-bomb``: 2 h of silence as FLAC (~180 KB) through the server's decode-and-limit path
  (``api.inputs.decode_audio_bytes``, limit 60 s), which must refuse it; once with the length in
  its header, once with the header's total zeroed (a streamed FLAC), so only decoding can tell.

Prints one JSON line per case: peak RSS growth, RSS kept after the case, wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RATES = (4001, 8001, 48001)
BOMB_SECONDS = 2 * 3600
BOMB_RATE = 8000
LIMIT_SECONDS = 60.0

_CHILD = r"""
import asyncio, io, json, resource, sys, time
import numpy as np, soundfile as sf, torch

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

case, arg, cap_gb = sys.argv[1], sys.argv[2], float(sys.argv[3])
from audio import resample
from api.inputs import decode_audio_bytes
from settings import Settings

if case == "resample":
    rate = int(arg)
    x = torch.sin(torch.arange(rate // 2, dtype=torch.float32) * 0.05)[None] * 0.3
    work = lambda: [resample(x, rate, 16000), resample(x, rate, 24000, kernel_dtype=torch.float32),
                    resample(x, rate, 16000, kernel_dtype=torch.float32)]
else:
    seconds, sr, stated = arg.split("@")
    seconds, sr = int(seconds), int(sr)
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(sr * 60, dtype=np.int16)
        for _ in range(seconds // 60):
            f.write(block)
    data = bytearray(buf.getvalue())
    if stated == "unstated":  # zero STREAMINFO's 36-bit total, as a streamed FLAC leaves it
        data[8 + 13] &= 0xF0
        data[8 + 14 : 8 + 18] = bytes(4)
    data = bytes(data)
    settings = Settings(max_audio_seconds=%(limit)r)
    def work():
        try:
            asyncio.run(decode_audio_bytes(data, settings=settings, param="file"))
            return "accepted"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:120]

resample(torch.zeros(1, 1600), 16000, 8000)  # warm torch's kernels before the baseline
base_rss, base_peak = rss_mb(), peak_mb()
cap = vm_bytes() + int(cap_gb * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
t0, c0 = time.perf_counter(), time.process_time()
try:
    outcome = work()
    outcome = outcome if isinstance(outcome, str) else "ok"
except (MemoryError, RuntimeError) as exc:
    outcome = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"case": case, "arg": arg, "outcome": outcome,
                  "peak_rss_growth_mb": round(peak_mb() - base_peak, 1),
                  "rss_kept_mb": round(rss_mb() - base_rss, 1),
                  "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}))
"""


def run_case(code_root: Path, case: str, arg: str, cap_gb: float) -> dict[str, object]:
    """One case in a fresh interpreter importing the project from ``code_root``."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    child = _CHILD % {"limit": LIMIT_SECONDS}
    proc = subprocess.run(
        [sys.executable, "-c", child, case, arg, str(cap_gb)],
        cwd=code_root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"case": case, "arg": arg, "outcome": f"process exited {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-root", type=Path, default=REPO_ROOT, help="checkout whose code is measured")
    parser.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap per case, GiB")
    parser.add_argument("--rates", type=int, nargs="*", default=list(RATES))
    parser.add_argument("--no-bomb", action="store_true")
    args = parser.parse_args()
    cases = [("resample", str(rate)) for rate in args.rates]
    if not args.no_bomb:
        cases += [("flac-bomb", f"{BOMB_SECONDS}@{BOMB_RATE}@{stated}") for stated in ("stated", "unstated")]
    for case, arg in cases:
        sys.stdout.write(json.dumps(run_case(args.code_root.resolve(), case, arg, args.cap_gb)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
