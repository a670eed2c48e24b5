"""Shared helpers of the SBL and CMTCS benchmarks: timed fits with a time budget, peak memory
of a fit in a fresh child process, and the markdown table."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(
    fit: Callable[[int], Any], full_iters: int, budget_s: float, probe_iters: int = 1
) -> dict[str, Any]:
    """Time ``fit(max_iter)``: the full run if a ``probe_iters``-iteration probe predicts it
    fits in ``budget_s``, else the probe alone (the result says which; per-iteration times count
    E-step + M-step pairs, ``max_iter + 1`` E-steps in a run, so a probe of ``p`` iterations
    divides its time by ``p + 1``).

    Besides wall-clock seconds, ``cpu_per_iter`` is the process's CPU time per iteration: with
    one pinned thread it equals the wall time on a quiet machine and, unlike it, does not grow
    when other jobs share the core.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        est = fit(probe_iters)
        probe, cpu = time.perf_counter() - t0, time.process_time() - c0
        per_iter = probe / (probe_iters + 1)
        if per_iter * (full_iters + 1) > budget_s:
            return {
                "est": None,
                "iters": probe_iters,
                "seconds": probe,
                "per_iter": per_iter,
                "cpu_per_iter": cpu / (probe_iters + 1),
                "full_seconds": per_iter * (full_iters + 1),
                "extrapolated": True,
            }
        t0, c0 = time.perf_counter(), time.process_time()
        est = fit(full_iters)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "est": est,
        "iters": full_iters,
        "seconds": seconds,
        "per_iter": seconds / (full_iters + 1),
        "cpu_per_iter": cpu / (full_iters + 1),
        "full_seconds": seconds,
        "extrapolated": False,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(build: Callable[..., Callable[[], Any]], args: tuple, queue: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    work = build(*args)  # the data, made before the measurement starts
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
    before = _status_kib("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work()
    queue.put((_status_kib("VmHWM") - before) / 1024.0)


def peak_memory_mib(build: Callable[..., Callable[[], Any]], args: tuple, threads: int) -> float:
    """Extra peak resident memory (MiB) of one fit in a fresh interpreter (spawn).

    ``build(*args)`` (a module-level function) makes the data and returns the zero-argument
    fit; the result is the high-water mark during the fit minus the resident size before it.
    A fresh process, because a forked one would reuse heap its parent freed and under-count.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(build, args, queue, threads))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    """The machine, and its load average when the results are written (other jobs on the same
    cores slow the wall-clock times; ``cpu_per_iter`` is immune)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write(name: str, rows: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "config": config, "rows": rows}, indent=1))
    return path


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are ``(key, header, format)``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
