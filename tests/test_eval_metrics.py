"""medblip-eval's figures: equal to scikit-learn's (or to a hand-checked value) on synthetic predictions, the
vectorised bootstrap versions equal to the point estimates, intervals that cover the true value about 95 % of the
time over simulated cohorts, and chance level where the predictions carry no information."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from medblip_edge.validation import bootstrap, calibrate, compare, metrics
from medblip_edge.validation.labels import normalise
from medblip_edge.errors import MedblipError


def synthetic(n=240, seed=0, signal=1.5, no_decision=0.0):
    """Labels with unequal class sizes, probabilities from a softmax of noisy class scores, some no-decisions."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.25, 0.35, 0.40])
    logits = rng.normal(size=(n, 3)) + signal * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = prob.argmax(1)
    pred[rng.random(n) < no_decision] = -1
    return y, pred, prob


@pytest.mark.parametrize("no_decision", [0.0, 0.1])
def test_point_figures_equal_scikit_learn(no_decision):
    y, pred, prob = synthetic(no_decision=no_decision)
    got = metrics.sklearn_figures(y, pred, prob)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    if no_decision == 0:
        assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert got["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    else:  # no decision counts as wrong: balanced accuracy is the mean recall over the three true classes
        recalls = [((pred == k) & (y == k)).sum() / (y == k).sum() for k in range(3)]
        assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))
        assert got["no_decision_rate"] == pytest.approx((pred < 0).mean())
        assert got["no_decision_rate"] > 0.05
    for k, label in enumerate(("AD", "MCI", "NC")):
        t, p = y == k, pred == k
        assert got[f"sensitivity/{label}"] == pytest.approx((t & p).sum() / t.sum())
        assert got[f"specificity/{label}"] == pytest.approx((~t & ~p).sum() / (~t).sum())
        assert got[f"ppv/{label}"] == pytest.approx((t & p).sum() / p.sum())
        assert got[f"npv/{label}"] == pytest.approx((~t & ~p).sum() / (~p).sum())
        assert got[f"f1/{label}"] == pytest.approx(skm.f1_score(t, p))
        assert got[f"auc/{label}"] == pytest.approx(skm.roc_auc_score(t, prob[:, k]))
    assert got["macro_auc"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr"))
    assert got["brier"] == pytest.approx(((prob - np.eye(3)[y]) ** 2).sum(1).mean())
    assert got["log_loss"] == pytest.approx(-np.log(prob[np.arange(len(y)), y]).mean())
    # the vectorised versions used for the bootstrap replicates give the same figures
    vec = metrics.all_figures(y[None], pred[None], prob[None])
    assert set(vec) == set(got)
    for name, value in got.items():
        assert vec[name][0] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_hand_checked_small_case():
    # 6 scans: truth AD AD MCI MCI NC NC; predictions AD MCI MCI none NC AD
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, -1, 2, 0])
    cm = metrics.confusion_matrix(y, pred)
    assert cm["matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]] and cm["no_decision"] == [0, 1, 0]
    f = metrics.sklearn_figures(y, pred)
    assert f["accuracy"] == pytest.approx(3 / 6)
    assert f["balanced_accuracy"] == pytest.approx(0.5)
    assert f["sensitivity/AD"] == pytest.approx(0.5) and f["ppv/AD"] == pytest.approx(0.5)
    assert f["specificity/AD"] == pytest.approx(3 / 4)  # MCI, MCI(none), NC, of NC AD wrongly
    assert f["npv/MCI"] == pytest.approx(3 / 4)  # not called MCI: scans 1, 4 (none, truly MCI), 5, 6 -> 3 of 4
    # weighted kappa over the 5 decided scans, weights (i-j)^2/4 in NC<MCI<AD order
    yd, pd_ = np.array([2, 2, 1, 0, 0]), np.array([2, 1, 1, 0, 2])  # ordinal (NC=0 .. AD=2)
    w = lambda a, b: (a - b) ** 2 / 4  # noqa: E731
    obs = np.mean([w(a, b) for a, b in zip(yd, pd_)])
    exp = np.mean([w(a, b) for a in yd for b in pd_])
    assert f["kappa_quadratic"] == pytest.approx(1 - obs / exp)


def test_ece_hand_checked():
    # top-label confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 0.4 (right): bins (0.8667,0.9333] and
    # (0.4667,0.5333] and (0.3333,0.4]: |0.5-0.9|*2/4 + |1-0.5|*1/4 + |1-0.4|*1/4 = 0.2 + 0.125 + 0.15
    prob = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.3, 0.4, 0.3]])
    y = np.array([0, 1, 0, 1])
    assert metrics.ece(y[None], prob[None])[0] == pytest.approx(0.475)
    rel = metrics.reliability(y, prob)
    assert [b["n"] for b in rel] == [1, 1, 2] and rel[-1]["accuracy"] == 0.5


def test_labels_and_synonyms():
    for text, want in [("CN", "NC"), (" control ", "NC"), ("Dementia", "AD"), ("Alzheimer's disease", "AD"),
                       ("mild_cognitive_impairment", "MCI"), ("LMCI", "MCI"), ("not demented", "NC")]:
        assert normalise(text, "row 2") == want
    with pytest.raises(MedblipError, match="row 9: unknown label 'stroke'"):
        normalise("stroke", "row 9")


def test_bootstrap_intervals_cover_the_true_value():
    """Over simulated cohorts of known balanced accuracy and AUC, the 95 % interval covers the truth in
    about 95 % of them (300 cohorts x 400 replicates; the band allows for the simulation's own noise)."""
    rng = np.random.default_rng(7)
    sims, reps, sizes = 300, 400, np.array([40, 60, 80])
    recall = np.array([0.7, 0.55, 0.8])
    d = 1.2  # class-0 score shift: AUC of class 0 vs rest = Phi(d / sqrt(2))
    true_ba, true_auc0 = recall.mean(), norm.cdf(d / np.sqrt(2))
    y = np.repeat(np.arange(3), sizes)
    hit_ba = hit_auc = 0
    for _ in range(sims):
        right = rng.random(len(y)) < recall[y]
        pred = np.where(right, y, (y + rng.integers(1, 3, len(y))) % 3)
        s0 = rng.normal(size=len(y)) + d * (y == 0)
        prob = np.stack([s0, np.zeros_like(s0), np.zeros_like(s0)], 1)
        idx = bootstrap.stratified_indices(y, reps, rng)
        ba = metrics.decision_figures(y[idx], pred[idx])["balanced_accuracy"]
        auc0 = metrics.auc_per_class(y[idx], prob[idx])[:, 0]
        lo, hi = bootstrap.interval(ba)
        hit_ba += lo <= true_ba <= hi
        lo, hi = bootstrap.interval(auc0)
        hit_auc += lo <= true_auc0 <= hi
    assert 0.90 <= hit_ba / sims <= 0.985, hit_ba / sims
    assert 0.90 <= hit_auc / sims <= 0.985, hit_auc / sims


def test_no_information_gives_chance():
    """Noise predictions, and true predictions with the labels shuffled, give balanced accuracy ~1/3 and AUC ~0.5,
    with the chance level inside the interval; the real predictions do not."""
    y, pred, prob = synthetic(n=600, seed=3, signal=2.0)
    rng = np.random.default_rng(11)
    shuffled = rng.permutation(y)
    noise = rng.dirichlet(np.ones(3), size=len(y))
    for yy, pp, pr in [(shuffled, pred, prob), (y, noise.argmax(1), noise)]:
        idx = bootstrap.stratified_indices(yy, 500, rng)
        point = metrics.sklearn_figures(yy, pp, pr)
        reps = metrics.all_figures(yy[idx], pp[idx], pr[idx])
        ci = bootstrap.with_intervals(point, reps)
        assert ci["balanced_accuracy"]["ci_low"] < 1 / 3 < ci["balanced_accuracy"]["ci_high"]
        assert ci["macro_auc"]["ci_low"] < 0.5 < ci["macro_auc"]["ci_high"]
    real = metrics.sklearn_figures(y, pred, prob)
    assert real["balanced_accuracy"] > 0.6 and real["macro_auc"] > 0.8


def test_calibration_fit_recovers_temperature_and_bias():
    rng = np.random.default_rng(5)
    n = 3000
    scores = rng.normal(scale=3.0, size=(n, 3))
    temperature, bias = 2.5, np.array([0.8, -0.4, 0.0])
    p = np.exp((scores + bias) / temperature)
    p /= p.sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    t, b, _ = calibrate.fit(scores, y)
    assert t == pytest.approx(temperature, rel=0.1)
    assert b == pytest.approx(bias, abs=0.35)
    cal, held = calibrate.split(y, 0.3, seed=1)
    assert not set(cal) & set(held) and len(cal) + len(held) == n
    for k in range(3):
        assert abs((y[cal] == k).sum() - 0.3 * (y == k).sum()) <= 1


def test_paired_comparison_and_mcnemar():
    y, pred, prob = synthetic(n=400, seed=9, signal=2.0)
    rng = np.random.default_rng(2)
    # a candidate that flips 10 % of the decisions to a wrong class: worse, and McNemar sees it
    worse = pred.copy()
    flip = rng.random(len(y)) < 0.10
    worse[flip] = (y[flip] + 1) % 3
    same = compare.paired(y, pred, prob, pred, prob, replicates=500, seed=1, margin=0.02)
    assert same["label_agreement"] == 1.0 and same["verdict"] == "non-inferior"
    assert same["mcnemar"]["p_value"] == 1.0
    bad = compare.paired(y, pred, prob, worse, prob, replicates=500, seed=1, margin=0.02)
    assert bad["verdict"] == "not shown non-inferior"
    assert bad["delta_balanced_accuracy"]["ci_high"] < 0
    b, c = bad["mcnemar"]["ref_only_correct"], bad["mcnemar"]["candidate_only_correct"]
    assert b == int(((pred == y) & (worse != y)).sum()) and c == int(((pred != y) & (worse == y)).sum())
    assert bad["mcnemar"]["p_value"] < 1e-3


def test_decision_rules_on_rows():
    from medblip_edge.validation.rules import PublishedRule, RowData, ScoreRule, Unavailable

    rows = [{"log_likelihoods": {"AD": -3.0, "MCI": -4.0, "NC": -5.0}, "greedy_answer": "Dementia"},
            {"log_likelihoods": {"AD": -3.0, "MCI": -4.0, "NC": -5.0}, "greedy_answer": " not  demented "},
            {"log_likelihoods": {"AD": -9.0, "MCI": -4.0, "NC": -5.0}, "greedy_answer": "mild cognitive impairment (MCI)"},
            {"log_likelihoods": {"AD": -9.0, "MCI": -4.0, "NC": -5.0}, "greedy_answer": "Dementia, probably"}]
    data = RowData.from_rows(rows, {"AD": 2, "MCI": 8, "NC": 4})
    assert PublishedRule().decide(data).pred.tolist() == [0, 2, 1, -1]
    summed = ScoreRule("sum", "").decide(data)
    assert summed.pred.tolist() == [0, 0, 1, 1]
    # per-token means: AD -1.5, MCI -0.5, NC -1.25 -> MCI; then AD -4.5, MCI -0.5, NC -1.25 -> MCI
    assert ScoreRule("mean", "").decide(data).pred.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(summed.prob[0], np.exp([-3, -4, -5]) / np.exp([-3, -4, -5]).sum())
    with pytest.raises(Unavailable, match="greedy_answer"):
        PublishedRule().decide(RowData.from_rows([{k: v for k, v in r.items() if k != "greedy_answer"}
                                                  for r in rows]))
