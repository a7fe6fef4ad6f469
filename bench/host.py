"""
What a benchmark's numbers are worth on this host: the matmul rate before and after the run, and how
much of the CPU other processes took meanwhile. Both move a CPU timing far more than most changes
of code do (the same 2048^3 matmul ran at 0.066 and 0.28 TFLOP/s on one host on two days), so every
benchmark here reports them beside its figures and warns when they say the run was not quiet.

    with host.Watch() as w:        # the matmul rate, then the CPU counters
        ...                        # the timed work, both sides alternated
    print(w.report())              # the rates before and after, the others' share, any warnings
"""
import os
import statistics
import time

import torch

DRIFT = 0.20        # the matmul rates before and after may differ by this fraction
SHARED = 0.10       # other processes may take this fraction of the CPU time the run had


def sync(device="cpu"):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeat: int, warm_ups: int = 1, device="cpu") -> float:
    """The best of `repeat` timings of fn() in seconds, after `warm_ups` untimed calls."""
    for _ in range(warm_ups):
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(dtype=torch.float32, device="cpu", n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of an n^3 matmul in `dtype`, the best of `repeat` after two warm-ups (the first
    product after a model loads runs slow): the peak the benchmarks divide by."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, repeat, warm_ups=2, device=device)


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process and its children), or None where
    /proc is not there."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)      # idle + iowait
    # utime, stime, cutime, cstime: fields 14-17 of /proc/self/stat (after the name)
    return sum(fields) - idle, sum(int(x) for x in mine[11:15])


def median_range(xs: list[float], digits: int = 1) -> str:
    """"median m (lo-hi, n)" of timings."""
    return (f"median {statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-"
            f"{max(xs):.{digits}f}, n={len(xs)})")


class Watch:
    """The matmul rate at the start and the end of a run, and the CPU time other processes took
    during it (from /proc: the machine's busy time minus this process's)."""

    def __init__(self, dtype=torch.float32, device="cpu"):
        self.dtype, self.device = dtype, device

    def __enter__(self):
        self.before = matmul_rate(self.dtype, self.device)
        self.t0, self.ticks0 = time.perf_counter(), cpu_ticks()
        return self

    def __exit__(self, *exc):
        self.wall, self.ticks1 = time.perf_counter() - self.t0, cpu_ticks()
        self.after = matmul_rate(self.dtype, self.device)
        return False

    def others(self) -> float | None:
        """The fraction of the machine's CPU time during the run that other processes used."""
        if self.ticks0 is None or self.ticks1 is None:
            return None
        hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        busy = self.ticks1[0] - self.ticks0[0]
        mine = self.ticks1[1] - self.ticks0[1]
        return max(0.0, busy - mine) / hz / (self.wall * cores)

    def warnings(self) -> list[str]:
        out = []
        drift = abs(self.after - self.before) / max(self.before, self.after)
        if drift > DRIFT:
            out.append(f"warning: the host's matmul rate moved by {100 * drift:.0f}% during the "
                       f"run ({self.before / 1e12:.3f} -> {self.after / 1e12:.3f} TFLOP/s): the "
                       f"machine was not quiet; do not publish these numbers")
        others = self.others()
        if others is not None and others > SHARED:
            out.append(f"warning: other processes used {100 * others:.0f}% of the "
                       f"{os.cpu_count()} cores' time during the run: it shared the CPU; do not "
                       f"publish these numbers")
        return out

    def report(self) -> str:
        """Lines on the host, warnings last."""
        others = self.others()
        shared = "unknown (no /proc)" if others is None else f"{100 * others:.1f}%"
        lines = [f"host: {torch.get_num_threads()} threads of {os.cpu_count()} cores; "
                 f"{str(self.dtype).removeprefix('torch.')} 2048^3 matmul at "
                 f"{self.before / 1e12:.3f} TFLOP/s before and {self.after / 1e12:.3f} after; "
                 f"other processes' share of the CPU during the run: {shared}"]
        return "\n".join(lines + self.warnings())

    @property
    def peak(self) -> float:
        """The rate the fractions of the bound divide by: the better of the two."""
        return max(self.before, self.after)


def provenance() -> str:
    """The commit (with "+ changes" when the tree is not clean), the time and the CPU: what a
    committed result file says it was made by."""
    import platform
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "no git"
    dirty = " + changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"commit {commit}{dirty}; {time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu}"
