"""The promotion decision: a pure function of per-probe scores and the policy.

Scores are `{"<task>/<metric>": {probe_id: value}}` for one evaluated model (candidate, champion or base), as
written by the evaluation stage (`per_probe.json`). Comparisons pair the same probes and judge the bootstrap CI of
the gain, never the point estimates alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from charforge.evaluation.metrics import paired_bootstrap_diff
from charforge.schemas.promote import Comparison, PromotionPolicy, Rule

Scores = dict[str, dict[str, float]]


@dataclass
class Check:
    metric: str
    kind: str          # "vs_base", "vs_champion", "quantized_vs_bf16", "max", "min", "missing"
    passed: bool
    detail: str
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    # How far inside (+) or outside (-) its threshold the judged number is: a comparison's CI lower bound minus
    # its threshold, a cap minus the mean, the mean minus a floor. None where there is nothing to measure.
    margin: float | None = None

    @property
    def rule(self) -> str:
        return f"{self.metric} {self.kind}"


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    needs_approval: bool = False

    def as_dict(self) -> dict:
        deciding = self.deciding
        return {"promote": self.promote, "reasons": self.reasons, "needs_approval": self.needs_approval,
                "summary": self.summary(), "deciding_rule": deciding.rule if deciding else None,
                "deciding_margin": deciding.margin if deciding else None,
                "checks": [asdict(c) for c in self.checks]}

    @property
    def deciding(self) -> Check | None:
        """The check that decided: for a refusal the failed check furthest outside its threshold (a missing metric
        first), for a promotion the passing check closest to its threshold."""
        failed = [c for c in self.checks if not c.passed]
        if failed:
            return min(failed, key=lambda c: float("-inf") if c.margin is None else c.margin)
        measured = [c for c in self.checks if c.margin is not None]
        return min(measured, key=lambda c: c.margin) if measured else None

    def margins(self) -> dict[str, float]:
        """Each measured check's margin by rule (`<metric> <kind>`), rounded for tags and tables."""
        return {c.rule: round(c.margin, 4) for c in self.checks if c.margin is not None}

    def summary(self) -> str:
        """One line a reviewer reads first (the registry version's description)."""
        deciding = self.deciding
        margin = f" (margin {deciding.margin:+.3f})" if deciding and deciding.margin is not None else ""
        if self.promote:
            tightest = f"; tightest: {deciding.rule}{margin}" if deciding else ""
            first = " (no champion yet: vs-champion rules skipped)" if any(
                r.startswith("no champion yet") for r in self.reasons) else ""
            return f"PROMOTE: all {len(self.checks)} checks pass{first}{tightest}"
        failed = sum(not c.passed for c in self.checks)
        return f"REFUSED: {failed} of {len(self.checks)} checks fail; deciding: {deciding.detail}{margin}"


def paired_gain(candidate: dict[str, float], other: dict[str, float], higher_is_better: bool, confidence: float,
                resamples: int, seed: int = 0) -> tuple[float, float, float, int]:
    """(mean gain, CI low, CI high, n) over the probes both models answered; gain > 0 means the candidate is better."""
    probes = sorted(candidate.keys() & other.keys())
    if not probes:
        raise ValueError("no probes in common")
    sign = 1.0 if higher_is_better else -1.0
    gain, low, high = paired_bootstrap_diff([sign * candidate[p] for p in probes], [sign * other[p] for p in probes],
                                            confidence, resamples, seed)
    return gain, low, high, len(probes)


def _compare(rule: Rule, kind: str, spec: Comparison, candidate: dict, other: dict,
             policy: PromotionPolicy) -> Check:
    gain, low, high, n = paired_gain(candidate, other, rule.higher_is_better, policy.confidence, policy.resamples)
    what = "bf16 when served quantized" if kind == "quantized_vs_bf16" else kind.removeprefix("vs_")
    passed = low >= spec.threshold
    if spec.min_improvement is not None:
        need = f"must improve on {what} by >= {spec.min_improvement:g}"
    else:
        need = f"may regress vs {what} by <= {spec.max_regression:g}"
    detail = (f"{rule.metric}: gain vs {what} {gain:+.3f} (95% CI {low:+.3f} .. {high:+.3f}, {n} probes); {need} "
              f"at the CI's lower bound -> {'ok' if passed else 'FAIL'}")
    return Check(rule.metric, kind, passed, detail, gain, low, high, margin=low - spec.threshold)


def decide(candidate: Scores, champion: Scores | None, base: Scores | None, policy: PromotionPolicy,
           quantized: tuple[Scores, Scores] | None = None) -> Decision:
    """Promote iff every rule passes. Without a champion (first version) the vs-champion checks are skipped and
    said so; a metric the policy needs but an evaluation lacks fails its rule. `quantized` = (scores on the
    quantized base, scores on the bf16 base) from one quantize run; without it the quantized_vs_bf16 rules are
    skipped (the version is not served quantized)."""
    checks: list[Check] = []
    if quantized is not None:
        checks += quantization_checks(quantized, policy)
    for rule in policy.rules:
        mine = candidate.get(rule.metric)
        if not mine:
            checks.append(Check(rule.metric, "missing", False,
                                f"{rule.metric}: missing from the candidate's evaluation -> FAIL"))
            continue
        mean = float(np.mean(list(mine.values())))
        if rule.max is not None:
            ok = mean <= rule.max
            checks.append(Check(rule.metric, "max", ok, f"{rule.metric}: {mean:.3f} {'<=' if ok else '>'} cap "
                                f"{rule.max:g} -> {'ok' if ok else 'FAIL'}", mean,
                                  margin=rule.max - mean))
        if rule.min is not None:
            ok = mean >= rule.min
            checks.append(Check(rule.metric, "min", ok, f"{rule.metric}: {mean:.3f} {'>=' if ok else '<'} floor "
                                f"{rule.min:g} -> {'ok' if ok else 'FAIL'}", mean,
                                  margin=mean - rule.min))
        for kind, spec, other in (("vs_base", rule.vs_base, base), ("vs_champion", rule.vs_champion, champion)):
            if spec is None:
                continue
            if other is None:
                if kind == "vs_champion":
                    continue  # first version: reported once below
                checks.append(Check(rule.metric, "missing", False,
                                    f"{rule.metric}: no base-model scores to compare with -> FAIL"))
                continue
            if not other.get(rule.metric) or not (mine.keys() & other[rule.metric].keys()):
                checks.append(Check(rule.metric, "missing", False, f"{rule.metric}: missing from the "
                                    f"{kind.removeprefix('vs_')}'s evaluation (or no probes in common) -> FAIL"))
                continue
            checks.append(_compare(rule, kind, spec, mine, other[rule.metric], policy))
    failed = [c.detail for c in checks if not c.passed]
    if quantized is None and any(r.quantized_vs_bf16 for r in policy.rules):
        checks.append(Check("-", "quantized_vs_bf16", True, "not evaluated on a quantized base: quantization rules "
                             "skipped"))
    reasons = failed or ["all policy rules pass"]
    if champion is None and any(r.vs_champion for r in policy.rules):
        reasons.append("no champion yet (first version): vs-champion rules skipped")
    promote = not failed
    needs_approval = promote and (policy.approval == "always" or
                                  (policy.approval == "first_version" and champion is None))
    return Decision(promote, reasons, checks, needs_approval)


def quantization_checks(quantized: tuple[Scores, Scores], policy: PromotionPolicy) -> list[Check]:
    """The largest drop each rule allows the quantized serving, judged on the paired CI like every comparison."""
    on_quantized, on_bf16 = quantized
    checks = []
    for rule in policy.rules:
        if rule.quantized_vs_bf16 is None:
            continue
        mine, ref = on_quantized.get(rule.metric), on_bf16.get(rule.metric)
        if not mine or not ref or not (mine.keys() & ref.keys()):
            checks.append(Check(rule.metric, "missing", False, f"{rule.metric}: missing from the quantized or bf16 "
                                f"evaluation (or no probes in common) -> FAIL"))
            continue
        checks.append(_compare(rule, "quantized_vs_bf16", rule.quantized_vs_bf16, mine, ref, policy))
    return checks


def decision_markdown(name: str, version: str, decision: Decision, champion_source: str) -> str:
    """The decision as a reviewer reads it: one row per check, then the reasons."""
    verdict = "PROMOTE" if decision.promote else "REJECT"
    lines = [f"# Promotion of {name} version {version}: {verdict}", "", f"Champion compared: {champion_source}", "",
             decision.summary(), "", "| check | passed | margin | detail |", "|---|---|---|---|"]
    lines += [f"| {c.kind} | {'yes' if c.passed else '**no**'} | "
              f"{'' if c.margin is None else f'{c.margin:+.3f}'} | {c.detail} |" for c in decision.checks]
    lines += ["", "Reasons:", *[f"- {r}" for r in decision.reasons]]
    return "\n".join(lines) + "\n"
