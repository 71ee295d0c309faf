"""Pure helpers: run order, medians, ratios, the targets and their checks, markdown tables."""
import math
import statistics

# The targets the benchmark checks (docs/benchmarks.md, "Targets")
CNX_FLOOR_FACTOR = 1.15  # (t_cnx / t_base) <= 1.15 * (flops_cnx / flops_base)
XS_VS_CN_OVERHEAD = 0.5  # (t_xs / t_base - 1) <= 0.5 * (t_cn / t_base - 1)
MI_VS_SUM = 1.03  # t_balanced <= 1.03 * t_summed


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def interleaved(names, repeats):
    """The run order A B C A B C ...: every repeat runs each configuration once, in turn."""
    return [(r, n) for r in range(repeats) for n in names]


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def overhead(r):
    return None if r is None else r - 1.0


def fmt(value, digits=3, suffix=""):
    if value is None:
        return "n/a"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def md_table(header, rows):
    """A markdown table; cells are str()-ed, '|' escaped."""
    def cell(v):
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values):
    """(max - min) / median of the repeats, in percent: how far apart the timed runs were."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return 100.0 * (max(values) - min(values)) / median(values)


def check_cnx_floor(t_ratio, f_ratio, factor=CNX_FLOOR_FACTOR):
    """(holds, measured/floor). The FLOP ratio is the floor a perfect implementation reaches."""
    if t_ratio is None or f_ratio is None:
        return None, None
    return t_ratio <= factor * f_ratio, t_ratio / f_ratio


def check_xs_vs_cn(t_xs, t_cn, factor=XS_VS_CN_OVERHEAD):
    """(holds, XS overhead / CN overhead) with overhead = ratio - 1."""
    if t_xs is None or t_cn is None:
        return None, None
    o_xs, o_cn = t_xs - 1.0, t_cn - 1.0
    if o_cn <= 0:
        return None, None
    return o_xs <= factor * o_cn, o_xs / o_cn


def check_mi_vs_sum(t_mi, t_sum, factor=MI_VS_SUM):
    """(holds, balanced / summed), both as ratios to the same base or absolute times."""
    if t_mi is None or t_sum is None or t_sum == 0:
        return None, None
    return t_mi <= factor * t_sum, t_mi / t_sum


def verdict(holds):
    return {True: "**holds**", False: "**missed**", None: "not measured"}[holds]
