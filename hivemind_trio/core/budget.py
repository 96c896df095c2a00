"""Token (and USD) budgets with reservation and reconciliation (SPEC §5.5), sans-io.

Theory of operation
-------------------
A *counter* holds, for one scope (the whole proxy, or one agent) and one
period instance (``run``, an hour such as ``2024-01-01T13``, a day such as
``2024-01-01``), the tokens/USD already ``used`` and those ``reserved`` by
requests in flight.  Period keys come from *wall-clock* time (``now`` here is
seconds since the epoch, shifted by ``utc_offset``), so a day budget resets at
the day boundary and a restart that reloads the counters does not refill it.

1. :meth:`Budget.reserve` takes an estimate (input tokens + ``max_tokens``)
   and checks every applicable limit: it refuses when
   ``used + reserved + estimate > limit`` (or the budget is already at 100 %).
   Otherwise it adds the estimate to ``reserved`` of each counter and returns a
   :class:`Reservation` naming those counters.
2. :meth:`Budget.reconcile` replaces the estimate by the actual usage in the
   same counters (those of the period the request *started* in).
3. :meth:`Budget.release` drops the estimate when the request failed with no
   usage.  Settling a reservation twice is a no-op.

Invariant (checked by the property tests), for every counter and limit ``L``::

    used + reserved <= L + overshoot

where ``overshoot`` is the sum over reconciled reservations of
``max(0, actual - estimate)``.  Proof sketch: a reservation is only granted
when the total after it is ``<= L``; a release only lowers the total; a
reconcile raises it by at most ``max(0, actual - estimate)``.  In words:
parallel requests can overshoot a budget only by what they consumed beyond
their own estimates, i.e. only by what was in flight when the budget ran out.
Also ``reserved`` always equals the sum of the estimates of the outstanding
reservations of that counter, and a global counter's ``used`` equals the sum
of the agents' ``used`` for the same period.

All state is plain attrs data (:class:`BudgetState`): a SQLite ledger or a
shared backend can persist and reload it as is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "PERIODS",
    "SCOPES",
    "Price",
    "BudgetLimit",
    "Counter",
    "Reservation",
    "Refusal",
    "Charge",
    "BudgetState",
    "CounterStatistics",
    "BudgetStatistics",
    "Budget",
    "period_key",
    "price_for",
]

PERIODS = ("run", "hour", "day")
SCOPES = ("global", "agent")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative number, got {value!r}")


def _optional_non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        _non_negative(_inst, attribute, value)


def _one_of(options: tuple[str, ...]) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in options:
            raise ValueError(f"{attribute.name} must be one of {options}, got {value!r}")

    return check


@attrs.frozen
class Price:
    """USD per million tokens."""

    input_per_mtok: float = attrs.field(validator=_non_negative)
    output_per_mtok: float = attrs.field(validator=_non_negative)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@attrs.frozen
class BudgetLimit:
    """One budget: a cap in tokens and/or USD per period, global or per agent.

    ``scope="agent"`` with ``agent=None`` gives every agent its own budget of
    this size; with ``agent="name"`` it applies to that agent only and replaces
    the every-agent limit of the same period for it.
    """

    period: str = attrs.field(validator=_one_of(PERIODS))
    tokens: int | None = attrs.field(default=None, validator=_optional_non_negative)
    usd: float | None = attrs.field(default=None, validator=_optional_non_negative)
    scope: str = attrs.field(default="agent", validator=_one_of(SCOPES))
    agent: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.tokens is None and self.usd is None:
            raise ValueError(f"a budget limit needs tokens or usd, got tokens=None usd=None (period={self.period!r})")
        if self.agent is not None and self.scope != "agent":
            raise ValueError(f"agent can only be set with scope='agent', got scope={self.scope!r} agent={self.agent!r}")


def period_key(period: str, wall_now: float, utc_offset: float = 0.0) -> str:
    """The instance of ``period`` that wall time ``wall_now`` falls in."""
    if period == "run":
        return "run"
    t = time.gmtime(math.floor(wall_now + utc_offset))
    if period == "hour":
        return time.strftime("%Y-%m-%dT%H", t)
    if period == "day":
        return time.strftime("%Y-%m-%d", t)
    raise ValueError(f"period must be one of {PERIODS}, got {period!r}")


def price_for(prices: Mapping[str, Price], model: str | None) -> Price | None:
    """Exact model name, else the longest table key the name starts with
    (``claude-sonnet-4-5`` prices ``claude-sonnet-4-5-20250929``)."""
    if not model:
        return None
    hit = prices.get(model)
    if hit is not None:
        return hit
    best = None
    for name, price in prices.items():
        if model.startswith(name) and (best is None or len(name) > len(best[0])):
            best = (name, price)
    return None if best is None else best[1]


@attrs.define
class Counter:
    used_tokens: int = 0
    reserved_tokens: int = 0
    used_usd: float = 0.0
    reserved_usd: float = 0.0
    requests: int = 0


@attrs.frozen
class Reservation:
    id: int
    agent: str
    tokens: int
    usd: float
    model: str | None
    # Counters charged, fixed at reservation time.
    keys: tuple[str, ...]
    # Some applicable budget is at or above the warning ratio.
    warning: bool = False


@attrs.frozen
class Refusal:
    """Why a request may not go out: which budget is spent."""

    agent: str
    scope: str
    period: str
    period_key: str
    unit: str  # "tokens" or "usd"
    limit: float
    used: float
    reserved: float
    requested: float

    @property
    def message(self) -> str:
        who = "global" if self.scope == "global" else f"agent {self.agent!r}"
        per = "for this run" if self.period == "run" else f"for {self.period} {self.period_key}"
        amount = f"{self.limit:g} tokens" if self.unit == "tokens" else f"${self.limit:.2f}"
        return (
            f"hivemind budget exhausted: the {who} budget of {amount} {per} is spent "
            f"(used {self.used:g}, reserved {self.reserved:g}, this request needs {self.requested:g})"
        )


@attrs.frozen
class Charge:
    """What a reconciled request finally cost."""

    tokens: int
    usd: float
    warning: bool


@attrs.define
class BudgetState:
    """Plain, serialisable state of all budgets."""

    counters: dict[str, Counter] = attrs.field(factory=dict)
    outstanding: dict[int, Reservation] = attrs.field(factory=dict)
    next_id: int = 1
    refusals: int = 0


@attrs.frozen
class CounterStatistics:
    key: str
    scope: str
    agent: str | None
    period: str
    period_key: str
    used_tokens: int
    reserved_tokens: int
    used_usd: float
    reserved_usd: float
    requests: int
    limit_tokens: int | None
    limit_usd: float | None
    warning: bool
    exhausted: bool


@attrs.frozen
class BudgetStatistics:
    counters: tuple[CounterStatistics, ...]
    outstanding: int
    refusals: int


def _counter_key(scope: str, agent: str | None, pkey: str) -> str:
    # '|' cannot be confused with a period key; the agent name goes last
    # so any character in it is harmless.
    return f"{scope}|{pkey}|{agent if scope == 'agent' else '*'}"


def _split_key(key: str) -> tuple[str, str, str | None]:
    scope, pkey, agent = key.split("|", 2)
    return scope, pkey, (agent if scope == "agent" else None)


def _period_of(pkey: str) -> str:
    if pkey == "run":
        return "run"
    return "hour" if "T" in pkey else "day"


@attrs.define
class Budget:
    limits: tuple[BudgetLimit, ...] = attrs.field(default=(), converter=tuple)
    prices: Mapping[str, Price] = attrs.field(factory=dict)
    warn_ratio: float = attrs.field(default=0.85)
    utc_offset: float = attrs.field(default=0.0, validator=attrs.validators.instance_of((int, float)))
    state: BudgetState = attrs.field(factory=BudgetState)

    @warn_ratio.validator
    def _check_warn(self, attribute: attrs.Attribute[Any], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")

    # -- which budgets apply ---------------------------------------------------

    def applicable(self, agent: str) -> list[BudgetLimit]:
        specific = {lim.period for lim in self.limits if lim.scope == "agent" and lim.agent == agent}
        out = []
        for lim in self.limits:
            if lim.scope == "global" or lim.agent == agent:
                out.append(lim)
            elif lim.agent is None and lim.period not in specific:
                out.append(lim)
        return out

    def _key(self, lim: BudgetLimit, agent: str, wall_now: float) -> str:
        return _counter_key(lim.scope, agent, period_key(lim.period, wall_now, self.utc_offset))

    def _keys(self, agent: str, wall_now: float) -> tuple[str, ...]:
        # Run totals are always kept: they are the per-agent and global usage
        # that status and metrics show, with or without a limit.
        keys = [_counter_key("agent", agent, "run"), _counter_key("global", agent, "run")]
        for lim in self.applicable(agent):
            k = self._key(lim, agent, wall_now)
            if k not in keys:
                keys.append(k)
        return tuple(keys)

    def _limits_by_key(self) -> dict[str, list[BudgetLimit]]:
        """Limits that check a counter; computed from the counter key itself."""
        out: dict[str, list[BudgetLimit]] = {}
        for key in self.state.counters:
            scope, pkey, agent = _split_key(key)
            period = _period_of(pkey)
            if scope == "global":
                out[key] = [lim for lim in self.limits if lim.scope == "global" and lim.period == period]
            else:
                assert agent is not None
                out[key] = [
                    lim for lim in self.applicable(agent) if lim.scope == "agent" and lim.period == period
                ]
        return out

    # -- estimating --------------------------------------------------------------

    def estimate_usd(
        self,
        model: str | None,
        tokens: int,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> float:
        price = price_for(self.prices, model)
        if price is None:
            # Unknown model: USD budgets cannot see it (tokens budgets still do).
            return 0.0
        if input_tokens is None and output_tokens is None:
            # No split known: charge all at the dearer rate, so the estimate is
            # an upper bound and reconciliation only ever gives back.
            return tokens * max(price.input_per_mtok, price.output_per_mtok) / 1e6
        return price.cost(input_tokens or 0, output_tokens or 0)

    # -- the protocol --------------------------------------------------------------

    def plan(
        self,
        agent: str,
        est_tokens: int,
        now: float,
        *,
        model: str | None = None,
        est_input: int | None = None,
        est_output: int | None = None,
    ) -> tuple[tuple[str, ...], list[tuple[int, str, float]], float]:
        """What :meth:`reserve` would charge and check, for a shared backend
        that decides elsewhere: ``(counter keys, [(key index, unit, limit)],
        estimated usd)``."""
        est_tokens = max(0, int(est_tokens))
        usd = self.estimate_usd(model, est_tokens, est_input, est_output)
        keys = self._keys(agent, now)
        checks: list[tuple[int, str, float]] = []
        for lim in self.applicable(agent):
            i = keys.index(self._key(lim, agent, now))
            if lim.tokens is not None:
                checks.append((i, "tokens", lim.tokens))
            if lim.usd is not None:
                checks.append((i, "usd", lim.usd))
        return keys, checks, usd

    def refusal(self, agent: str, key: str, unit: str, limit: float, used: float, reserved: float, requested: float) -> Refusal:
        """A refusal decided elsewhere (a shared backend), counted here."""
        scope, pkey, _ = _split_key(key)
        self.state.refusals += 1
        return Refusal(agent=agent, scope=scope, period=_period_of(pkey), period_key=pkey, unit=unit,
                       limit=limit, used=used, reserved=reserved, requested=requested)

    def adopt(self, key: str, used_tokens: int, reserved_tokens: int, used_usd: float, reserved_usd: float, requests: int) -> None:
        """Take a counter's values from a shared backend (the fleet's totals)."""
        c = self.state.counters.setdefault(key, Counter())
        c.used_tokens, c.reserved_tokens = int(used_tokens), max(0, int(reserved_tokens))
        c.used_usd, c.reserved_usd, c.requests = float(used_usd), max(0.0, float(reserved_usd)), int(requests)

    def reserve(
        self,
        agent: str,
        est_tokens: int,
        now: float,
        *,
        model: str | None = None,
        est_input: int | None = None,
        est_output: int | None = None,
        check: bool = True,
    ) -> Reservation | Refusal:
        """Reserve an estimate against every applicable budget, or say which one is spent.

        ``now`` is wall-clock time (seconds since the epoch): periods are calendar ones.
        ``check=False`` books a reservation a shared backend already granted.
        """
        est_tokens = max(0, int(est_tokens))
        usd = self.estimate_usd(model, est_tokens, est_input, est_output)
        st = self.state
        warning = False
        for lim in self.applicable(agent) if check else ():
            key = self._key(lim, agent, now)
            c = st.counters.get(key) or Counter()
            pkey = _split_key(key)[1]
            checks: list[tuple[str, float, float, float, float]] = []
            if lim.tokens is not None:
                checks.append(("tokens", lim.tokens, c.used_tokens, c.reserved_tokens, est_tokens))
            if lim.usd is not None:
                checks.append(("usd", lim.usd, c.used_usd, c.reserved_usd, usd))
            for unit, limit, used, reserved, need in checks:
                if used + reserved >= limit or used + reserved + need > limit:
                    st.refusals += 1
                    return Refusal(
                        agent=agent,
                        scope=lim.scope,
                        period=lim.period,
                        period_key=pkey,
                        unit=unit,
                        limit=limit,
                        used=used,
                        reserved=reserved,
                        requested=need,
                    )
                if limit > 0 and (used + reserved + need) >= self.warn_ratio * limit:
                    warning = True
        keys = self._keys(agent, now)
        for key in keys:
            c = st.counters.setdefault(key, Counter())
            c.reserved_tokens += est_tokens
            c.reserved_usd += usd
            c.requests += 1
        if not check:
            warning = self._warning(keys)
        res = Reservation(
            id=st.next_id, agent=agent, tokens=est_tokens, usd=usd, model=model, keys=keys, warning=warning
        )
        st.next_id += 1
        st.outstanding[res.id] = res
        return res

    def _unreserve(self, res: Reservation) -> None:
        for key in res.keys:
            c = self.state.counters.setdefault(key, Counter())
            c.reserved_tokens -= res.tokens
            c.reserved_usd -= res.usd
            if c.reserved_usd < 1e-9:
                # Float sums drift: don't leave -1e-17 dollars in flight.
                c.reserved_usd = 0.0

    def reconcile(self, reservation: Reservation, actual_in: int, actual_out: int) -> Charge | None:
        """Replace the estimate by the actual usage.  None if already settled."""
        st = self.state
        if st.outstanding.pop(reservation.id, None) is None:
            return None
        actual_in = max(0, int(actual_in))
        actual_out = max(0, int(actual_out))
        tokens = actual_in + actual_out
        price = price_for(self.prices, reservation.model)
        usd = price.cost(actual_in, actual_out) if price is not None else 0.0
        self._unreserve(reservation)
        for key in reservation.keys:
            c = st.counters[key]
            c.used_tokens += tokens
            c.used_usd += usd
        return Charge(tokens=tokens, usd=usd, warning=self._warning(reservation.keys))

    def release(self, reservation: Reservation) -> bool:
        """Drop a reservation that consumed nothing.  False if already settled."""
        if self.state.outstanding.pop(reservation.id, None) is None:
            return False
        self._unreserve(reservation)
        for key in reservation.keys:
            self.state.counters[key].requests -= 1
        return True

    def _warning(self, keys: tuple[str, ...]) -> bool:
        by_key = self._limits_by_key()
        for key in keys:
            c = self.state.counters.get(key)
            if c is None:
                continue
            for lim in by_key.get(key, ()):
                if lim.tokens and c.used_tokens + c.reserved_tokens >= self.warn_ratio * lim.tokens:
                    return True
                if lim.usd and c.used_usd + c.reserved_usd >= self.warn_ratio * lim.usd:
                    return True
        return False

    # -- reading -------------------------------------------------------------------

    def remaining_tokens(self, agent: str, now: float) -> int | None:
        """Tokens this agent could still reserve now (None: no token budget applies)."""
        best: int | None = None
        for lim in self.applicable(agent):
            if lim.tokens is None:
                continue
            c = self.state.counters.get(self._key(lim, agent, now)) or Counter()
            left = max(0, lim.tokens - c.used_tokens - c.reserved_tokens)
            best = left if best is None else min(best, left)
        return best

    def prune(self, now: float) -> list[str]:
        """Forget counters of past hours/days with nothing in flight; return their keys.

        A ledger persists them first if it wants history.
        """
        current = {period_key(p, now, self.utc_offset) for p in PERIODS}
        busy = {k for r in self.state.outstanding.values() for k in r.keys}
        gone = [
            k for k in self.state.counters if _split_key(k)[1] not in current and k not in busy
        ]
        for k in gone:
            del self.state.counters[k]
        return gone

    def statistics(self) -> BudgetStatistics:
        by_key = self._limits_by_key()
        out = []
        for key, c in sorted(self.state.counters.items()):
            scope, pkey, agent = _split_key(key)
            lims = by_key.get(key, [])
            tok = [lim.tokens for lim in lims if lim.tokens is not None]
            usd = [lim.usd for lim in lims if lim.usd is not None]
            lt = min(tok) if tok else None
            lu = min(usd) if usd else None
            total_t = c.used_tokens + c.reserved_tokens
            total_u = c.used_usd + c.reserved_usd
            out.append(
                CounterStatistics(
                    key=key,
                    scope=scope,
                    agent=agent,
                    period=_period_of(pkey),
                    period_key=pkey,
                    used_tokens=c.used_tokens,
                    reserved_tokens=c.reserved_tokens,
                    used_usd=c.used_usd,
                    reserved_usd=c.reserved_usd,
                    requests=c.requests,
                    limit_tokens=lt,
                    limit_usd=lu,
                    warning=bool(
                        (lt is not None and total_t >= self.warn_ratio * lt)
                        or (lu is not None and total_u >= self.warn_ratio * lu)
                    ),
                    exhausted=bool((lt is not None and c.used_tokens >= lt) or (lu is not None and c.used_usd >= lu)),
                )
            )
        return BudgetStatistics(
            counters=tuple(out), outstanding=len(self.state.outstanding), refusals=self.state.refusals
        )
