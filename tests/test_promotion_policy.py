"""decide(candidate, champion, base, policy): table-driven, on literal per-probe scores."""

from __future__ import annotations

import pytest

from charforge.config import ConfigError, load_yaml_model
from charforge.promotion import decide, paired_gain
from charforge.schemas.promote import PromotionPolicy
from charforge.settings import CONFIGS_DIR

PROBES = [f"p{i}" for i in range(40)]


def scores(**metrics) -> dict:
    """metric=list of 40 values, or a float for a constant."""
    return {name.replace("__", "/"): dict(zip(PROBES, v if isinstance(v, list) else [v] * 40))
            for name, v in metrics.items()}


def alternating(a: float, b: float) -> list[float]:
    return [a if i % 2 else b for i in range(40)]


POLICY = PromotionPolicy(approval="never", resamples=500, rules=[
    {"metric": "character_generation/char_id_acc", "vs_base": {"max_regression": 0.05},
     "vs_champion": {"max_regression": 0.05}},
    {"metric": "character_generation/ooc_rate", "max": 0.10, "vs_champion": {"max_regression": 0.03}},
    {"metric": "character_reply_likelihood/bits_per_byte", "vs_base": {"min_improvement": 0.0}},
])

GOOD = scores(character_generation__char_id_acc=alternating(1.0, 0.0), character_generation__ooc_rate=0.0,
              character_reply_likelihood__bits_per_byte=1.0)
CHAMPION = scores(character_generation__char_id_acc=alternating(1.0, 0.0), character_generation__ooc_rate=0.0,
                  character_reply_likelihood__bits_per_byte=1.1)
BASE = scores(character_generation__char_id_acc=alternating(1.0, 0.0), character_generation__ooc_rate=0.05,
              character_reply_likelihood__bits_per_byte=1.3)


@pytest.mark.parametrize("case, candidate, champion, base, promote, reason", [
    ("improves on everything", GOOD, CHAMPION, BASE, True, "all policy rules pass"),
    ("ties the champion: within the allowed regression", CHAMPION, CHAMPION, BASE, True, "all policy rules pass"),
    ("regresses beyond the CI margin",
     {**GOOD, **scores(character_generation__char_id_acc=alternating(0.0, 0.0))}, CHAMPION, BASE, False,
     "character_generation/char_id_acc: gain vs champion -0.500 (95% CI"),
    ("exceeds the out-of-character cap",
     {**GOOD, **scores(character_generation__ooc_rate=alternating(1.0, 0.0))}, None, BASE, False,
     "character_generation/ooc_rate: 0.500 > cap 0.1 -> FAIL"),
    ("first version: no champion, judged against base and caps", GOOD, None, BASE, True,
     "no champion yet (first version): vs-champion rules skipped"),
    ("missing metric in the candidate",
     {k: v for k, v in GOOD.items() if k != "character_reply_likelihood/bits_per_byte"}, CHAMPION, BASE, False,
     "character_reply_likelihood/bits_per_byte: missing from the candidate's evaluation -> FAIL"),
    ("missing metric in the champion", GOOD,
     {k: v for k, v in CHAMPION.items() if k != "character_generation/ooc_rate"}, BASE, False,
     "character_generation/ooc_rate: missing from the champion's evaluation (or no probes in common) -> FAIL"),
    ("no base scores", GOOD, CHAMPION, None, False,
     "character_generation/char_id_acc: no base-model scores to compare with -> FAIL"),
    ("must improve on base bits/byte, but is worse",
     {**GOOD, **scores(character_reply_likelihood__bits_per_byte=1.5)}, None, BASE, False,
     "character_reply_likelihood/bits_per_byte: gain vs base -0.200"),
])
def test_decide(case, candidate, champion, base, promote, reason):
    decision = decide(candidate, champion, base, POLICY)
    assert decision.promote is promote, (case, decision.reasons)
    assert any(r.startswith(reason) for r in decision.reasons), (case, decision.reasons)


def test_failing_decision_lists_every_failed_rule():
    bad = scores(character_generation__char_id_acc=0.0, character_generation__ooc_rate=1.0,
                 character_reply_likelihood__bits_per_byte=2.0)
    decision = decide(bad, CHAMPION, BASE, POLICY)
    assert not decision.promote and len(decision.reasons) == 5  # char_id x2, ooc cap, ooc vs champion, bpb


@pytest.mark.parametrize("approval, champion, needs", [
    ("first_version", None, True), ("first_version", CHAMPION, False), ("always", CHAMPION, True),
    ("never", None, False),
])
def test_when_a_human_must_approve(approval, champion, needs):
    policy = POLICY.model_copy(update={"approval": approval})
    assert decide(GOOD, champion, BASE, policy).needs_approval is needs


def test_paired_gain_is_signed_so_that_positive_is_better():
    lower_is_better = paired_gain({"a": 0.1, "b": 0.1}, {"a": 0.3, "b": 0.3}, False, 0.95, 200)
    assert lower_is_better[0] == pytest.approx(0.2) and lower_is_better[3] == 2


def test_shipped_policy_loads():
    policy = load_yaml_model(CONFIGS_DIR / "promotion.yaml", PromotionPolicy)
    assert policy.approval == "first_version" and policy.rules


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - metric: character_generation/char_id_macro_f1\n    max: 1\n",
     "key 'rules.0': Value error, metric 'character_generation/char_id_macro_f1' cannot be gated per probe"),
    ("rules:\n  - metric: character_mc/acc_norm\n    vs_base: {min_improvement: 0.0, max_regression: 0.1}\n",
     "key 'rules.0.vs_base': Value error, set exactly one of min_improvement or max_regression"),
    ("rules: []\n", "key 'rules': List should have at least 1 item after validation"),
])
def test_bad_policy_names_the_rule(tmp_path, text, message):
    path = tmp_path / "promotion.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml_model(path, PromotionPolicy)
    assert str(err.value).startswith(f"{path}: {message}")


# Near the threshold: the gate judges the CI's lower bound, never the mean alone. Champion bits/byte 1.0 on every
# probe; the candidate is 0.03 worse on average in both cases, inside the 0.05 margin.
NEAR = PromotionPolicy(approval="never", resamples=2000, rules=[
    {"metric": "character_reply_likelihood/bits_per_byte", "vs_champion": {"max_regression": 0.05}},
    {"metric": "character_generation/ooc_rate", "max": 0.10}])
FLAT = scores(character_reply_likelihood__bits_per_byte=1.0, character_generation__ooc_rate=0.0)


def near(spread: float, ooc_probes: int = 0) -> dict:
    return scores(character_reply_likelihood__bits_per_byte=[1.03 + s for s in alternating(spread, -spread)],
                  character_generation__ooc_rate=[1.0] * ooc_probes + [0.0] * (40 - ooc_probes))


def test_the_mean_passes_but_the_ci_lower_bound_fails():
    """Mean regression 0.03 (inside 0.05), but the probes disagree (+-0.25): the CI's lower bound is far outside."""
    decision = decide(near(0.25), FLAT, None, NEAR)
    [check] = [c for c in decision.checks if c.kind == "vs_champion"]
    assert not decision.promote
    assert check.estimate == pytest.approx(-0.03) and check.estimate > -0.05  # a mean-based gate would promote
    assert check.ci_low < -0.09 and check.margin == pytest.approx(check.ci_low + 0.05)
    assert decision.deciding is check
    assert decision.summary().startswith("REFUSED: 1 of 2 checks fail; deciding: character_reply_likelihood/"
                                         "bits_per_byte: gain vs champion -0.030 (95% CI -0.1")


def test_a_dip_whose_ci_stays_inside_the_margin_passes():
    """The same mean regression, consistent across probes (+-0.02): the lower bound stays inside the margin."""
    decision = decide(near(0.02), FLAT, None, NEAR)
    [check] = [c for c in decision.checks if c.kind == "vs_champion"]
    assert decision.promote, decision.reasons
    assert check.estimate == pytest.approx(-0.03) and -0.05 < check.ci_low < -0.03
    assert 0 < check.margin < 0.02 and decision.deciding is check  # the tightest check of a promotion
    assert decision.summary() == f"PROMOTE: all 2 checks pass; tightest: character_reply_likelihood/bits_per_byte " \
                                 f"vs_champion (margin {check.margin:+.3f})"


@pytest.mark.parametrize("ooc_probes, promote, margin", [(4, True, 0.0), (5, False, -0.025)])
def test_a_cap_is_inclusive_and_its_margin_is_exact(ooc_probes, promote, margin):
    """4 of 40 out of character is exactly the 0.10 cap (allowed); 5 is one probe over it."""
    decision = decide(near(0.02, ooc_probes), FLAT, None, NEAR)
    [cap] = [c for c in decision.checks if c.kind == "max"]
    assert (decision.promote, cap.passed) == (promote, promote)
    assert cap.margin == pytest.approx(margin)
    assert decision.margins()["character_generation/ooc_rate max"] == pytest.approx(margin)


def test_a_refusal_is_decided_by_the_check_furthest_outside():
    decision = decide(near(0.25, ooc_probes=20), FLAT, None, NEAR)
    assert [c.kind for c in decision.checks if not c.passed] == ["vs_champion", "max"]
    assert decision.deciding.rule == "character_generation/ooc_rate max"  # -0.40 beyond the cap vs ~-0.06
    assert decision.as_dict()["deciding_margin"] == pytest.approx(-0.40)
