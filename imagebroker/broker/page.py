"""The cost report as one self-contained HTML file (no CDN, no script): charts drawn with matplotlib as inline
SVG, each beside the table of the figures it draws, every figure the ledger holds in the DOM with a
`data-figure` name. Needs the `[report]` extra (matplotlib)."""

from __future__ import annotations

import html
import io
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from ..errors import MissingExtra
from ..policies.schema import Policy
from .budgets import period_key
from .economics import BreakEven
from .ledger.schema import calls, from_nusd
from .ledger.store import Ledger
from .report import Group, cost_report
from .whatif import WhatIf

STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2430;padding:0 1rem}
h1{font-size:1.6rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:2.2rem 0 .6rem;border-bottom:1px solid #dde}
.kpis{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}.kpi{background:#f3f5f9;border-radius:8px;padding:.7rem 1rem}
.kpi b{display:block;font-size:1.35rem}table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{padding:.2rem .7rem;text-align:right;border-bottom:1px solid #eef}td:first-child,th:first-child{text-align:left}
.chart svg{max-width:100%;height:auto}.note{color:#667;font-size:.85rem}"""


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("report", "matplotlib") from None
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _usd(value: Decimal | None) -> str:
    return "unpriced" if value is None else f"${value:.6f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], figure: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td data-figure="{figure}-{i}-{j}">{html.escape(c)}</td>'
                                    for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
    return f"<table><tr>{th}</tr>{body}</table>"


def _daily(ledger: Ledger, since: float | None) -> dict[str, dict[str, Decimal]]:
    q = select(calls.c.day, func.coalesce(calls.c.provider, "(none)"), func.sum(calls.c.cost_nusd)).where(
        calls.c.status != "pending")
    if since is not None:
        q = q.where(calls.c.created_at >= since)
    out: dict[str, dict[str, Decimal]] = defaultdict(dict)
    with ledger.engine.connect() as conn:
        for day, provider, nusd in conn.execute(q.group_by(calls.c.day, calls.c.provider)):
            out[day][provider] = from_nusd(int(nusd or 0)) or Decimal(0)
    return dict(sorted(out.items()))


def _cost_per_day(daily: dict[str, dict[str, Decimal]], providers: list[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    bottom = [0.0] * len(daily)
    for p in providers:
        values = [float(d.get(p, 0)) for d in daily.values()]
        ax.bar(list(daily), values, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("USD")
    ax.set_title("cost per day, by provider")
    if providers:
        ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return _svg(fig)


def _by_offering(groups: list[Group]) -> str:
    plt = _plt()
    priced = [g for g in groups if g.images and g.avg_cost_per_image_usd is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 + 0.45 * max(1, len(groups))))
    left.barh([g.key for g in priced], [float(g.avg_cost_per_image_usd or 0) for g in priced], color="#4c72b0")
    left.set_title("cost per image, by offering (USD)")
    timed = [g for g in groups if g.latency_p50_s is not None]
    y = range(len(timed))
    right.barh([i + 0.2 for i in y], [g.latency_p95_s or 0 for g in timed], height=0.4, label="p95", color="#dd8452")
    right.barh([i - 0.2 for i in y], [g.latency_p50_s or 0 for g in timed], height=0.4, label="p50", color="#55a868")
    right.set_yticks(list(y), [g.key for g in timed])
    right.set_title("latency, by offering (s)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return _svg(fig)


def _budgets(policy: Policy, ledger: Ledger) -> tuple[str, list[list[str]]]:
    plt = _plt()
    keys = [(b.name, period_key(b.period)) for b in policy.budgets]
    counters = ledger.counters(keys) if keys else {}
    rows, names, spent, limits = [], [], [], []
    for b, key in zip(policy.budgets, keys, strict=True):
        used = counters.get(key, (Decimal(0), Decimal(0)))[0]
        rows.append([f"{b.name} ({key[1]})", _usd(used), _usd(b.limit_usd)])
        names.append(b.name)
        spent.append(float(used))
        limits.append(float(b.limit_usd))
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.5 * max(1, len(names))))
    ax.barh(names, limits, color="#e3e6ee", label="limit")
    ax.barh(names, spent, color="#c44e52", label="spent")
    ax.set_title("budgets against their limits (USD)")
    if names:
        ax.legend(fontsize=8)
    return _svg(fig), rows


def _whatif_chart(w: WhatIf) -> str:
    plt = _plt()
    groups = sorted(w.groups.values(), key=lambda g: g.key)
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.5 * max(1, len(groups))))
    y = range(len(groups))
    ax.barh([i + 0.2 for i in y], [float(g.actual_usd) for g in groups], height=0.4, label="actual")
    ax.barh([i - 0.2 for i in y], [float(g.whatif_usd) for g in groups], height=0.4, label=f"under {w.policy}")
    ax.set_yticks(list(y), [g.key for g in groups])
    ax.set_title(f"what-if: actual cost against policy {w.policy} (USD)")
    ax.legend(fontsize=8)
    return _svg(fig)


def _breakeven_chart(b: BreakEven) -> str:
    plt = _plt()
    top = max(b.breakeven_images_per_month * 2, 10)
    volumes = [round(top * i / 40) for i in range(41)]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(volumes, [float(b.hosted_usd(v)) for v in volumes], label="hosted API")
    ax.plot(volumes, [float(b.self_hosted_usd(v)) for v in volumes], label="dedicated GPU(s)")
    ax.axvline(b.breakeven_images_per_month, color="#999", linestyle="--", linewidth=1)
    ax.set_xlabel("images per month")
    ax.set_ylabel("USD per month")
    ax.set_title("break-even: hosted against self-hosted")
    ax.legend(fontsize=8)
    return _svg(fig)


def render(ledger: Ledger, policy: Policy, *, since: float | None = None, whatif: WhatIf | None = None,
           breakeven: BreakEven | None = None) -> str:
    """The whole page, as a string."""
    by_offering, total = cost_report(ledger, since=since, by="offering")
    daily = _daily(ledger, since)
    providers = sorted({p for d in daily.values() for p in d})
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    span = "all time" if since is None else f"since {datetime.fromtimestamp(since, UTC).date()}"
    parts = [f"<!doctype html><html lang=en><meta charset=utf-8><title>imagebroker costs</title><style>{STYLE}</style>",
             f"<h1>Where the money went</h1><p class=note>ledger {html.escape(ledger.path)}, {span}; "
             f"generated {generated}</p><div class=kpis>",
             f'<div class=kpi>total cost<b data-figure="total-cost">{_usd(total.cost_usd)}</b></div>',
             f'<div class=kpi>calls<b data-figure="total-calls">{total.calls}</b></div>',
             f'<div class=kpi>images<b data-figure="total-images">{total.images}</b></div>',
             f'<div class=kpi>failed<b data-figure="total-failures">{total.failures}</b></div>',
             f'<div class=kpi>cache saved<b data-figure="cache-saved">{_usd(total.saved_usd)}</b></div></div>',
             f"<h2>Cost per day</h2><div class=chart>{_cost_per_day(daily, providers)}</div>",
             _table(["day", *providers], [[day, *(_usd(d.get(p, Decimal(0))) for p in providers)]
                                           for day, d in daily.items()], "daily"),
             f"<h2>By offering</h2><div class=chart>{_by_offering(by_offering)}</div>",
             _table(["offering", "calls", "images", "failed", "cost", "$/image", "p50", "p95"],
                    [[g.key, str(g.calls), str(g.images), str(g.failures), _usd(g.cost_usd),
                      _usd(g.avg_cost_per_image_usd) if g.images else "-",
                      f"{g.latency_p50_s:.2f} s" if g.latency_p50_s is not None else "-",
                      f"{g.latency_p95_s:.2f} s" if g.latency_p95_s is not None else "-"] for g in by_offering],
                    "offering")]
    if policy.budgets:
        chart, rows = _budgets(policy, ledger)
        parts += [f"<h2>Budgets (policy {html.escape(policy.name)})</h2><div class=chart>{chart}</div>",
                  _table(["budget", "spent", "limit"], rows, "budget")]
    if whatif is not None:
        d = whatif.as_dict()
        parts += [f"<h2>What-if: policy {html.escape(whatif.policy)}</h2>",
                  f"<div class=chart>{_whatif_chart(whatif)}</div>",
                  f'<p>actual <b data-figure="whatif-actual">{_usd(whatif.actual_usd)}</b>, under '
                  f'{html.escape(whatif.policy)} <b data-figure="whatif-cost">{_usd(whatif.whatif_usd)}</b> '
                  f'(up to {_usd(whatif.whatif_bound_usd)}); {d["whatif"]["calls_unroutable"]} call(s) would have '
                  f'no route, {d["whatif"]["calls_local"]} would run locally</p>',
                  *_prices_note(whatif),
                  _table(["from", "to", "calls"], [[m["from"], m["to"], str(m["calls"])] for m in d["moves"]], "move")]
    if breakeven is not None:
        parts += [f"<h2>Break-even</h2><div class=chart>{_breakeven_chart(breakeven)}</div><ul>",
                  *(f"<li>{html.escape(line)}</li>" for line in breakeven.arithmetic()), "</ul>"]
    parts.append(f"<p class=note>imagebroker, {time.strftime('%Y-%m-%d')}: costs are exact sums of what each call "
                 "was recorded at; latencies are within 0.5%.</p></html>")
    return "\n".join(parts)


def _prices_note(whatif: Any) -> list[str]:
    """Which day's prices the what-if used, and whose price that day the catalog does not record."""
    if whatif.prices_as_of is None:
        return []
    said = f"<p>at the catalog's prices of <b data-figure=\"whatif-prices-as-of\">{whatif.prices_as_of}</b>"
    if whatif.prices_not_recorded:
        missing = ", ".join(f"{html.escape(o)} ({n})" for o, n in whatif.prices_not_recorded.most_common())
        said += f"; no price recorded that day for {missing}: today's stood in"
    return [said + "</p>"]
