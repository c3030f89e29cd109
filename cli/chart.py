"""``rnx job metrics --chart``: a job's CPU and memory history as a terminal chart (no I/O).

Two panels of vertical bars drawn with the Unicode eighth blocks (``▁▂▃▄▅▆▇█``), so each row has
eight levels, over a shared time axis from the first sample to the last. The chart is as wide as
it is told (the terminal's width); each column covers an equal slice of the job's time and shows
the mean CPU and the highest memory of the samples in it (a column with no sample repeats the one
before: the value held until the next sample).

Only plain characters and these blocks are used: any UTF-8 terminal shows it, no dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cli.output import format_bytes
from joblet.protocol import joblet_pb2 as pb

#: Rows of each panel (eight levels per row).
PANEL_HEIGHT = 8
#: Narrowest plot area drawn, whatever the terminal says.
MIN_PLOT_WIDTH = 10
_BLOCKS = " ▁▂▃▄▅▆▇█"
_GUTTER = 8  # right-aligned y labels ("100.0%", "1023MB") plus " ┤"


def render_chart(samples: Sequence[pb.JobMetricsSample], width: int) -> str:
    """The chart of ``samples`` (oldest first), at most ``width`` characters wide.

    The plot is never narrower than :data:`MIN_PLOT_WIDTH` columns; text lines are cut to fit.

    Returns:
        The lines, joined; a one-line note when there are no samples.
    """
    if not samples:
        return "No metrics samples."
    plot_width = max(MIN_PLOT_WIDTH, width - _GUTTER - 2)
    times = [s.timestampUnixNano for s in samples]
    cpu = [s.cpu.usagePercent for s in samples]
    memory = [float(s.memory.current) for s in samples]
    cpu_columns = _columns(times, cpu, plot_width, _mean)
    memory_columns = _columns(times, memory, plot_width, max)
    cpu_top = max(100.0, _round_up(max(cpu), 25.0))
    limit = max(s.memory.limit for s in samples)
    peak = max(max(memory), max(float(s.memory.peak) for s in samples))
    memory_top = max(1.0, max(memory))
    duration = (times[-1] - times[0]) / 1e9

    lines = [
        f"CPU (% of one core): mean {_mean(cpu):.1f}%, max {max(cpu):.1f}%",
        *_panel(cpu_columns, cpu_top, lambda v: f"{v:.0f}%"),
        "",
        f"Memory: peak {format_bytes(peak)}"
        + (f" of {format_bytes(limit)} limit" if limit else "")
        + f", last {format_bytes(memory[-1])}",
        *_panel(memory_columns, memory_top, format_bytes),
        " " * _GUTTER + " └" + "─" * plot_width,
        _time_axis(duration, plot_width),
        f"{len(samples)} samples from {samples[0].timestamp} to {samples[-1].timestamp}",
    ]
    return "\n".join(line[: max(width, _GUTTER + 2 + MIN_PLOT_WIDTH)] for line in lines)


def _columns(
    times: Sequence[int],
    values: Sequence[float],
    width: int,
    combine: Callable[[Sequence[float]], float],
) -> list[float]:
    """One value per column: the samples whose time falls in the column, combined."""
    start, span = times[0], max(1, times[-1] - times[0])
    buckets: list[list[float]] = [[] for _ in range(width)]
    for t, v in zip(times, values, strict=True):
        buckets[min(width - 1, (t - start) * width // span)].append(v)
    out: list[float] = []
    held = values[0]
    for bucket in buckets:
        if bucket:
            held = combine(bucket)
        out.append(held)
    return out


def _panel(columns: Sequence[float], top: float, label: Callable[[float], str]) -> list[str]:
    levels = [min(PANEL_HEIGHT * 8, round(max(0.0, v) / top * PANEL_HEIGHT * 8)) for v in columns]
    rows = []
    for row in range(PANEL_HEIGHT):
        floor = (PANEL_HEIGHT - 1 - row) * 8
        cells = "".join(_BLOCKS[min(8, max(0, level - floor))] for level in levels)
        if row == 0:
            axis = f"{label(top):>{_GUTTER}} ┤"
        elif row == PANEL_HEIGHT - 1:
            axis = f"{label(0):>{_GUTTER}} ┤"
        else:
            axis = " " * _GUTTER + " │"
        rows.append(axis + cells)
    return rows


def _time_axis(duration: float, width: int) -> str:
    left, right = "0s", _format_seconds(duration)
    gap = max(1, width - len(left) - len(right))
    return " " * (_GUTTER + 2) + left + " " * gap + right


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _round_up(value: float, step: float) -> float:
    return math.ceil(value / step) * step if value > 0 else 0.0
