"""Tables for `moe-offload simulate`: one row per setting, and the grid of settings to run."""
from __future__ import annotations

import itertools

from ..errors import MoeOffloadError
from .policies import POLICIES
from .simulate import Result, Setting


def parse_ints(text: str | None, default: list[int]) -> list[int]:
    if not text:
        return default
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoeOffloadError(f"expected comma-separated integers, got {text!r}") from None


def parse_names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise MoeOffloadError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}")
    return names


def grid(policies, slots, scopes, prefetch, lookahead, window) -> list[Setting]:
    out = []
    for scope, n, policy in itertools.product(scopes, slots, policies):
        for k, la in itertools.product(prefetch, lookahead):
            if k == 0 and la != lookahead[0]:
                continue  # lookahead means nothing without prefetch
            out.append(Setting(policy, n, scope, k, la if k else 1, window))
    return out


HEAD = f"{'scope':<7}{'slots':>6} {'policy':<7}{'pf':>3}{'la':>3}{'hit rate':>10}{'loads':>8}{'MiB read':>10}" \
       f"{'pf useful':>12}{'precision':>10}{'recall':>8}"


def format_row(r: Result) -> str:
    s = r.setting
    pf = f"{r.prefetch_useful}/{r.prefetch_loads}" if s.prefetch else "-"
    prec = f"{r.precision:.3f}" if s.prefetch else "-"
    rec = f"{r.recall:.3f}" if s.prefetch else "-"
    return (f"{s.scope:<7}{s.slots:>6} {s.policy:<7}{s.prefetch:>3}{s.lookahead if s.prefetch else '-':>3}"
            f"{r.hit_rate:>10.3f}{r.demand_loads + r.prefetch_loads:>8}{r.bytes_read / 2**20:>10.1f}"
            f"{pf:>12}{prec:>10}{rec:>8}")


__all__ = ["POLICIES", "parse_ints", "parse_names", "grid", "HEAD", "format_row"]
