"""Plots of a fitted cascade policy for the ``cascade_policy`` asset's metadata: what the
served point costs and what it buys, over λ (one α) and over α (the cascade refitted).

Both read the policy artifact only (``CascadePolicyParams.frontier`` /
``alpha_frontier``), in-sample numbers on the val_calib threshold part; the certified
region is where the CRC bound is at most α (every λ >= λ̂, the family is nested).
Matplotlib's object API with the Agg canvas (no pyplot state, safe in a worker); the PNG
is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from roadwork_assets.contracts.policy_schemas import CascadePolicyParams
from roadwork_assets.core.artifacts import atomic_path

SERVED_STYLE = {"marker": "*", "s": 160, "color": "black", "zorder": 5}


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} stored in the policy", ha="center", va="center",
            transform=ax.transAxes)
    ax.set_axis_off()


def _risk_panel(ax, params: CascadePolicyParams, lam: np.ndarray, pts) -> None:
    ax.axvspan(params.lambda_certified, 1.0, color="tab:green", alpha=0.12,
               label=f"certified (λ ≥ λ̂ = {params.lambda_certified:.3f})")
    ax.plot(lam, [p.reward for p in pts], ".-", color="tab:blue", label="estimated reward")
    ax.plot(lam, [p.fnr for p in pts], ".-", color="tab:red", label="FNR (in-sample)")
    ax.plot(lam, [p.crc_bound for p in pts], ".--", color="tab:purple", label="CRC bound")
    ax.axhline(params.alpha, color="tab:red", ls=":", lw=1, label=f"α = {params.alpha:g}")
    ax.scatter([params.lam], [params.estimated_reward], label="served", **SERVED_STYLE)
    ax.scatter([params.lam], [params.threshold_fnr], marker="*", s=90, color="tab:red",
               zorder=5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("reward / rate")
    ax.legend(fontsize=7, loc="best")


def _cost_panel(ax, params: CascadePolicyParams, lam: np.ndarray, pts) -> None:
    ax.axvspan(params.lambda_certified, 1.0, color="tab:green", alpha=0.12)
    ax.plot(lam, [p.routing_rate for p in pts], ".-", color="tab:orange",
            label="routing rate (stage 2)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("routing rate", color="tab:orange")
    ax.set_xlabel("λ (stage-2 threshold t₂ = 1 − λ)")
    lat = ax.twinx()
    lat.plot(lam, [p.latency_s for p in pts], ".-", color="tab:gray", label="latency")
    lat.axhline(params.latency_budget_s, color="tab:gray", ls="--", lw=1,
                label=f"budget {params.latency_budget_s:g} s")
    lat.scatter([params.lam], [params.expected_latency_s], **SERVED_STYLE)
    lat.set_ylabel("expected latency per image (s)", color="tab:gray")
    top = max([params.latency_budget_s, params.expected_latency_s]
              + [p.latency_s for p in pts])
    lat.set_ylim(0.0, 1.1 * top if top > 0 else 1.0)
    handles = ax.get_legend_handles_labels()
    more = lat.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="best")


def plot_cascade_frontier(params: CascadePolicyParams, path: Path) -> Path:
    """Risk, reward and cost over λ on the threshold part: estimated reward, FNR and the
    CRC bound (top), routing rate and expected latency against the budget (bottom); the
    certified region shaded, α drawn, the served λ starred."""
    fig = Figure(figsize=(7, 6.5), dpi=100)
    risk, cost = fig.subplots(2, 1, sharex=True)
    pts = sorted(params.frontier, key=lambda p: p.lam)
    if not pts:
        _empty(risk, "λ frontier")
        _empty(cost, "λ frontier")
    else:
        lam = np.array([p.lam for p in pts])
        _risk_panel(risk, params, lam, pts)
        _cost_panel(cost, params, lam, pts)
        cost.set_xlim(-0.02, 1.02)
    fig.suptitle(f"Cascade frontier (val_calib threshold part): α = {params.alpha:g}, "
                 f"ρ = {params.rho:g}, b₀ = {params.exit_pos_floor:g}, served λ = "
                 f"{params.lam:.3f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_alpha_frontier(params: CascadePolicyParams, path: Path) -> Path:
    """What each α costs, the cascade refitted at it: estimated reward, routing rate and
    expected latency vs α; infeasible α marked ✕ on the axis, the served α drawn."""
    fig = Figure(figsize=(6.5, 6.5), dpi=100)
    axes = fig.subplots(3, 1, sharex=True)
    pts = sorted(params.alpha_frontier, key=lambda p: p.alpha)
    if not pts:
        for ax in axes:
            _empty(ax, "α frontier")
        return _save(fig, path)
    ok = [p for p in pts if p.feasible and p.reward is not None]
    bad = [p.alpha for p in pts if not (p.feasible and p.reward is not None)]
    series = (("estimated reward", "reward", "tab:blue"),
              ("routing rate", "routing_rate", "tab:orange"),
              ("latency per image (s)", "latency_s", "tab:gray"))
    for ax, (label, attr, color) in zip(axes, series, strict=True):
        xs = [p.alpha for p in ok if getattr(p, attr) is not None]
        ys = [getattr(p, attr) for p in ok if getattr(p, attr) is not None]
        ax.plot(xs, ys, "o-", color=color)
        if bad:
            ax.scatter(bad, [0.0] * len(bad), marker="x", s=60, color="tab:red",
                       transform=ax.get_xaxis_transform(), clip_on=False,
                       label="infeasible α", zorder=5)
        ax.axvline(params.alpha, color="black", ls=":", lw=1,
                   label=f"served α = {params.alpha:g}")
        ax.set_ylabel(label, fontsize=8)
    axes[2].axhline(params.latency_budget_s, color="tab:gray", ls="--", lw=1,
                    label=f"budget {params.latency_budget_s:g} s")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="best")
    axes[2].legend(fontsize=7, loc="best")
    axes[2].set_xscale("log")
    alphas = [p.alpha for p in pts] + [params.alpha]
    axes[2].set_xlim(min(alphas) / 1.3, max(alphas) * 1.3)  # infeasible ones too
    axes[2].set_xlabel("α (FNR target)")
    fig.suptitle(f"Cascade α frontier: {len(ok)} feasible of {len(pts)} (val_calib)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
