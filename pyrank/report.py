"""What an analysis looks like to a person: the summary tables and the plots of a report.

Everything here reads the report dict that :func:`pyrank.pipeline.analyze_run` returns (the
same structure as ``report.json``); nothing here reads weights.
"""
from __future__ import annotations

import math
import os

__all__ = ["layer_type", "jsonable", "print_summary", "print_diagnostics", "plots"]


def layer_type(name):
    """(block index, module type) of a tensor name: ``model.layers.3.mlp.up_proj.weight`` →
    (3, "up_proj"); -1 outside the blocks."""
    from .io.select import layer_index

    layer = layer_index(name)
    typ = name[:-len(".weight")].rsplit(".", 1)[-1] if name.endswith(".weight") else name
    return layer, typ


def jsonable(x):
    """``x`` with NaN and ±Inf floats as None (JSON has neither), tuples as lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def print_summary(report):
    """One line per module type: σ1 at the last step, energy fraction, R² in the step and vs
    the metric, update sparsity (means over layers)."""
    by_type = {}
    for m in report["modules"].values():
        by_type.setdefault(m["type"], []).append(m)
    print(f"{'module type':<14}{'n':>4}{'σ1 (last)':>12}{'energy':>9}{'R² step':>9}{'R² metric':>11}{'sparsity':>10}")
    for typ, ms in sorted(by_type.items()):
        def mean(xs):
            xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
            return sum(xs) / len(xs) if xs else float("nan")
        print(f"{typ:<14}{len(ms):>4}{mean([m['sigma'][-1][0] for m in ms]):>12.4g}"
              f"{mean([m['energy'][-1] for m in ms]):>9.3f}{mean([m['r2_step'] for m in ms]):>9.3f}"
              f"{mean([m['r2_metric'] for m in ms]):>11.3f}{mean([m['sparsity'][-1] for m in ms]):>10.3f}")


def _type_means(report, fn):
    """{module type: mean of fn(module) over its layers, NaN/None ignored}."""
    by_type = {}
    for m in report["modules"].values():
        v = fn(m)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_type.setdefault(m["type"], []).append(v)
    return {t: sum(v) / len(v) for t, v in by_type.items()}


def print_diagnostics(report):
    """The last checkpoint's §3 diagnostics, mean over layers, per module type."""
    cols = [("angle_u_max", "max∠U (°)"), ("angle_v_max", "max∠V (°)"), ("nss", "NSS"),
            ("overlap_princ", "∩princ"), ("overlap_low", "∩low"), ("jaccard_prev", "J prev")]
    means = {c: _type_means(report, lambda m, c=c: m["diagnostics"][-1][c]) for c, _ in cols}
    base_j = _type_means(report, lambda m: m["diagnostics"][-1]["jaccard_baseline"])
    d = report["diagnostics"]
    print(f"\ndiagnostics at the last checkpoint (k={d['k']}, α={d['alpha']}: random overlap = α; "
          "J prev: Jaccard with the previous checkpoint's changed mask, random baseline in brackets)")
    print(f"{'module type':<14}" + "".join(f"{h:>11}" for _, h in cols))
    for typ in sorted(means["nss"]):
        vals = [means[c].get(typ, float("nan")) for c, _ in cols]
        line = f"{typ:<14}" + "".join(f"{v:>11.4g}" for v in vals)
        if typ in base_j:
            line += f" ({base_j[typ]:.3g})"
        print(line)


def plots(report, d):
    """σ1 over steps per module type; layer × type heatmaps of energy fraction and R² (and,
    with diagnostics, of the principal-weight overlap, plus a diagnostics panel) as PNGs in
    directory ``d``. Returns a note to show when matplotlib is missing, else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'pyrank[plots]')"
    mods = report["modules"]
    types = sorted({m["type"] for m in mods.values()})
    layers = sorted({m["layer"] for m in mods.values()})
    fig, ax = plt.subplots(figsize=(7, 4))
    for typ in types:
        ms = [m for m in mods.values() if m["type"] == typ]
        steps = ms[0]["steps"]
        mean = [sum(m["sigma"][i][0] for m in ms) / len(ms) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=typ)
    ax.set_xlabel("step")
    ax.set_ylabel("σ1 of ΔW (mean over layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "sigma1.png"), dpi=120)
    plt.close(fig)
    heatmaps = [(lambda m: m["energy"][-1], "energy fraction σ1²/‖ΔW‖² (last step)", "energy_heatmap.png", 1),
                (lambda m: m["r2_step"], "R² of û(t) linear in step", "r2_heatmap.png", 1)]
    if "diagnostics" in report:  # per layer: the last checkpoint's overlap with the principal weights
        alpha = report["diagnostics"]["alpha"]
        def princ(m):  # None (JSON for NaN) when nothing changed
            v = m["diagnostics"][-1]["overlap_princ"]
            return None if v is None else v / alpha
        heatmaps.append((princ,
                         "overlap with principal weights ÷ random (last step)", "principal_overlap_heatmap.png", 2))
    for get, title, fn, vmax in heatmaps:
        grid = [[float("nan")] * len(types) for _ in layers]
        for m in mods.values():
            v = get(m)
            grid[layers.index(m["layer"])][types.index(m["type"])] = float("nan") if v is None else v
        fig, ax = plt.subplots(figsize=(1 + 0.8 * len(types), 1 + 0.3 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fn), dpi=120)
        plt.close(fig)
    if "diagnostics" in report:
        panels = [("angle_u_max", "max principal angle, U (°)"), ("nss", "normalized spectral shift"),
                  ("overlap_princ", "overlap with principal weights"), ("overlap_low", "overlap with low-|W0| weights")]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, (key, title) in zip(axes, panels):
            for typ in types:
                ms = [m for m in mods.values() if m["type"] == typ]
                steps = ms[0]["steps"]
                ys = [sum(m["diagnostics"][i][key] for m in ms) / len(ms) for i in range(len(steps))]
                ax.plot(steps, ys, marker=".", label=typ)
            if key.startswith("overlap"):
                ax.axhline(report["diagnostics"]["alpha"], color="gray", ls="--", lw=0.8, label="random")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "diagnostics.png"), dpi=110)
        plt.close(fig)
    return None
