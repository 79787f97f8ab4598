"""What generate.py shows: progress bar, summary table, the --verify judgement (files: job_output.py)."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

__all__ = ["FP32_TOLERANCE", "Progress", "judge", "low_precision_bound", "peak_memory", "print_summary", "relative_error", "step_time"]

# How --verify judges the sequence-parallel result P against one-process reruns of the same
# steps (same weights, inputs and kernel; no sequence parallelism):
#
# fp32: ||P - R|| / ||R|| <= 1e-4, R the fp32 rerun. Both runs do the same math; only the order
#   of floating-point sums differs (softmax merged over ring blocks, matmuls over shorter
#   sequences): measured ~1e-6 here, while real mistakes (a shard rotated with the wrong
#   positions, a shard attended twice or not at all) give 1e-1 to 1.
# fp16/bf16: rounding alone moves P by ~1e-2 (bf16) or ~2e-3 (fp16), as much as a mistake
#   confined to a few tokens would, so no fixed bound separates the two. Instead R32 (an
#   fp32 rerun with the same rounded weights) is the truth and the one-process low-precision
#   rerun R_low shows what rounding alone costs: pass iff
#   ||P - R32|| <= 2 * ||R_low - R32|| + 1e-4 ||R32||. Measured: P and R_low are within 10%
#   of each other's distance to R32, for every layout.
FP32_TOLERANCE = 1e-4
ROUNDING_FACTOR = 2.0


def low_precision_bound(rounding_floor: float) -> float:
    """Pass bound on rel(P, R32) for fp16/bf16, given rel(R_low, R32)."""
    return ROUNDING_FACTOR * rounding_floor + FP32_TOLERANCE


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """``{"max_abs", "rel"}``: max |a - e| and ||a - e|| / ||e|| (Frobenius, in float64)."""
    a, e = actual.double(), expected.double()
    return {"max_abs": (a - e).abs().max().item(), "rel": ((a - e).norm() / e.norm().clamp_min(1e-300)).item()}


def judge(parallel: dict, same_dtype: dict, fp32: dict | None, dtype_name: str = "fp32") -> dict:
    """The --verify verdict for each named tensor of the parallel run.

    ``same_dtype``: the one-process rerun in the run's dtype; ``fp32``: the fp32 rerun
    (``None`` when the run is fp32 itself); ``dtype_name`` labels the run's dtype. Returns ``{"checks": {name: {...}}, "passed"}``.
    """
    checks = {}
    for name, got in parallel.items():
        if fp32 is None:
            err, bound, basis = relative_error(got, same_dtype[name]), FP32_TOLERANCE, ""
        else:
            floor = relative_error(same_dtype[name], fp32[name])["rel"]
            err, bound = relative_error(got, fp32[name]), low_precision_bound(floor)
            basis = f" = {ROUNDING_FACTOR:g} x {dtype_name} rerun's {floor:.2e} + {FP32_TOLERANCE:g}"
        checks[name] = {**err, "bound": bound, "basis": basis, "passed": err["rel"] <= bound}
    return {"checks": checks, "passed": all(c["passed"] for c in checks.values())}


class Progress:
    """Progress over denoising steps (tqdm if installed, else a text bar on stderr); records step times."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.times = total, enabled, []
        self._last = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc="denoising", unit="step")

    def step(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the step, not its launch
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        done, width = len(self.times), 30
        filled = width * done // self.total
        line = f"denoising [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  {self.times[-1]:.2f} s/step"
        end = "\r" if sys.stderr.isatty() and done < self.total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def peak_memory(device: torch.device) -> tuple[str, float]:
    """``(what, bytes)``: the largest over all ranks of CUDA max_memory_allocated, or of max RSS on CPU."""
    if device.type == "cuda":
        what, value = "CUDA max_memory_allocated", float(torch.cuda.max_memory_allocated(device))
    else:
        what, value = "max RSS (whole process)", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return what, t.item()


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def step_time(times: list[float], first_sparse_step: int | None = None) -> str:
    """The summary's step time: the median of the steps after the first, so that one step that compiles a
    kernel (the first call, and the first sparse step after dense ones) does not stand for every step; those
    steps are shown beside it."""
    if len(times) < 2:
        return _seconds(times[0]) if times else "-"
    firsts = [f"first {_seconds(times[0])}"]
    if first_sparse_step is not None and 0 < first_sparse_step < len(times):
        firsts.append(f"first sparse {_seconds(times[first_sparse_step])}")
    return f"{_seconds(statistics.median(times[1:]))} median ({', '.join(firsts)})"


def _seconds(t: float) -> str:
    """Milliseconds below a second, three significant digits (a 5 ms step is not "0.005 s")."""
    return f"{t:.3f} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def print_summary(args, state, dtype, result: dict) -> None:
    """The closing table (rank 0)."""
    times = result["step_times"]
    rows = [("prompt", repr(args.prompt))] if args.prompt else []
    rows += [("weights", result["weights"])] if result.get("weights") else []
    rows += [
        ("tokens", f"{result['tokens']} per sample x batch {result['batch']}"
                   + (" (CFG)" if result["batch"] == 2 else "")),
        ("layout", (f"CFG {state.cfg_degree} x " if state.cfg_degree > 1 else "")
                   + f"Ulysses {state.ulysses_degree} x ring {state.ring_degree}"),
        *([("sparse attention", result["sparse"])] if result.get("sparse") else []),
        ("world size", str(state.world_size * state.cfg_degree)),
        ("attention backend", str(state.backend) + (
            f" (layers: {result['layer_backend']})" if result["layer_backend"] not in (None, state.backend) else "")),
        ("dtype", str(dtype).replace("torch.", "")),
        ("steps", str(len(times))),
        ("time per step", step_time(times, result.get("first_sparse_step"))),
        ("denoising total", f"{sum(times):.2f} s"),
        ("wall (setup to end)", f"{result['wall']:.2f} s"),
        ("peak memory", f"{_mib(result['peak'][1])} ({result['peak'][0]}, max over ranks)"),
    ]
    verdict = result.get("verify")
    if verdict is not None:
        for name, c in verdict["checks"].items():
            rows.append((f"verify: {name}", f"rel {c['rel']:.2e} (bound {c['bound']:.1e}{c['basis']}), "
                                            f"max abs {c['max_abs']:.2e}{'' if c['passed'] else '  <-- FAIL'}"))
        rows.append(("verify", f"{'PASS' if verdict['passed'] else 'FAIL'} vs one-process fp32 rerun "
                               f"(reruns on rank 0 took {verdict['seconds']:.1f} s)"))
    rows.insert(0, ("quantity", "value"))
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    print(f"| {rows[0][0]:{width}} | {rows[0][1]:{vwidth}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|")
    rows = rows[1:]
    for k, v in rows:
        print(f"| {k:{width}} | {v:{vwidth}} |")
    sys.stdout.flush()
