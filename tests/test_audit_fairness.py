"""Fairness audit: fairlearn's numbers per group, honest intervals, flags only where the data can carry them,
and the federated table (from per-site confusion counts) identical to the pooled one."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_positive_rate,
    selection_rate,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    multilabel_confusion_matrix,
    recall_score,
)

from audit.fairness import assess_fairness, assess_fairness_from_confusion
from fedvision.dp import SECRET_SOURCE, epsilon_of
from fedvision.errors import ConfigError, DataError

# Per skin tone: (samples, probability of a correct prediction). V is served badly; VI is tiny and always wrong.
PLANTED = {"I": (600, 0.92), "II": (500, 0.9), "III": (400, 0.9), "V": (300, 0.6), "VI": (10, 0.0)}


def planted(seed=0):
    rng = np.random.default_rng(seed)
    tones = np.concatenate([[tone] * n for tone, (n, _) in PLANTED.items()])
    p_correct = np.concatenate([[p] * n for _, (n, p) in PLANTED.items()])
    n = len(tones)
    y_true = rng.integers(0, 2, n)
    y_pred = np.where(rng.random(n) < p_correct, y_true, 1 - y_true)
    features = pd.DataFrame({"skin_tone": tones, "sex": rng.choice(["female", "male"], n)})
    return y_true, y_pred, features


@pytest.fixture(scope="module")
def binary():
    y_true, y_pred, features = planted()
    return y_true, y_pred, features, assess_fairness(y_true, y_pred, features)


def ovr_fpr(y_true, y_pred, k):
    """Independent one-vs-rest FPR, averaged over the classes that have negatives (sklearn's per-class counts)."""
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=list(range(k)))
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    has_negatives = (tn + fp) > 0
    return float(np.mean(fp[has_negatives] / (tn + fp)[has_negatives]))


def test_point_values_are_fairlearns_metricframe_values(binary):
    y_true, y_pred, features, table = binary
    direct_metrics = {"accuracy": accuracy_score, "recall": lambda t, p: recall_score(t, p, pos_label=1),
                      "fpr": lambda t, p: false_positive_rate(t, p, pos_label=1),
                      "selection_rate": lambda t, p: selection_rate(t, p, pos_label=1)}
    intersection = features["skin_tone"] + "×" + features["sex"]
    for attribute, groups in (("skin_tone", features["skin_tone"]), ("skin_tone×sex", intersection)):
        direct = MetricFrame(metrics=direct_metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
        for group, row in direct.by_group.iterrows():
            for metric, value in row.items():
                assert table[attribute]["groups"][group]["metrics"][metric]["value"] == pytest.approx(value, abs=1e-12)
        for metric, value in direct.overall.items():
            assert table[attribute]["overall"]["metrics"][metric]["value"] == pytest.approx(value, abs=1e-12)
        assert {g: e["count"] for g, e in table[attribute]["groups"].items()} == groups.value_counts().to_dict()


def test_multiclass_values_and_per_class_recall_disparity():
    rng = np.random.default_rng(1)
    n, k = 900, 3
    sites = rng.choice(["a", "b", "c"], n)
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < np.where(sites == "c", 0.5, 0.85), y_true, rng.integers(0, k, n))
    table = assess_fairness(y_true, y_pred, {"site": sites}, class_names=["nevus", "keratosis", "melanoma"])["site"]
    direct = MetricFrame(metrics={"accuracy": accuracy_score, "recall": balanced_accuracy_score,
                                  "fpr": lambda t, p: ovr_fpr(t, p, k),
                                  "selection_rate": lambda t, p: selection_rate(t, p, pos_label=k - 1)},
                         y_true=y_true, y_pred=y_pred, sensitive_features=sites)
    for group, row in direct.by_group.iterrows():
        for metric, value in row.items():
            assert table["groups"][group]["metrics"][metric]["value"] == pytest.approx(value, abs=1e-12)
    per_class = {g: recall_score(y_true[sites == g], y_pred[sites == g], average=None, labels=list(range(k)))
                 for g in ("a", "b", "c")}
    for c, name in enumerate(["nevus", "keratosis", "melanoma"]):
        recalls = {g: r[c] for g, r in per_class.items()}
        entry = table["disparity"][name]
        assert entry["min_group"] == min(recalls, key=recalls.get) == "c"
        assert entry["max_group"] == max(recalls, key=recalls.get)
        assert entry["difference"] == pytest.approx(max(recalls.values()) - min(recalls.values()))
        assert entry["ratio"] == pytest.approx(min(recalls.values()) / max(recalls.values()))


def test_planted_accuracy_gap_is_flagged_and_the_best_group_is_not(binary):
    table = binary[3]["skin_tone"]
    sufficient = {g: e["metrics"]["accuracy"]["value"] for g, e in table["groups"].items() if e["sufficient"]}
    assert table["reference_group"] == max(sufficient, key=sufficient.get)
    flagged = {(f["group"], f["metric"]) for f in table["flags"]}
    assert ("V", "accuracy") in flagged
    assert all(f["group"] != table["reference_group"] for f in table["flags"])
    # Groups whose accuracy is within the four-fifths band of the reference are not flagged for accuracy.
    assert not {("II", "accuracy"), ("III", "accuracy")} & flagged
    flag = next(f for f in table["flags"] if (f["group"], f["metric"]) == ("V", "accuracy"))
    assert flag["ratio"] == pytest.approx(flag["value"] / flag["reference"]) and flag["ratio"] < 0.8
    assert flag["direction"] == "worse" and "\n" not in flag["reason"]
    # 300 samples at 0.6 against ≈0.92: the whole interval is below 0.8 × the reference, so the flag is firm.
    lo, hi = table["groups"]["V"]["metrics"]["accuracy"]["ci"]
    assert flag["outside_with_ci"] and hi < 0.8 * flag["reference"]


def test_a_marginal_flag_on_a_small_group_is_not_firm():
    # Exactly 30 of 40 right (0.75) against 1900 of 2000 (0.95): the point ratio 0.79 is flagged, but the small
    # group's interval reaches above 0.8 × the reference.
    rng = np.random.default_rng(3)
    groups = np.array(["A"] * 2000 + ["B"] * 40)
    y_true = rng.integers(0, 2, len(groups))
    correct = np.array([True] * 1900 + [False] * 100 + [True] * 30 + [False] * 10)
    table = assess_fairness(y_true, np.where(correct, y_true, 1 - y_true), pd.DataFrame({"g": groups}))["g"]
    flag = next(f for f in table["flags"] if (f["group"], f["metric"]) == ("B", "accuracy"))
    lo, hi = table["groups"]["B"]["metrics"]["accuracy"]["ci"]
    assert flag["ratio"] < 0.8 and hi >= 0.8 * flag["reference"] and not flag["outside_with_ci"]


def test_small_group_is_insufficient_data_and_never_judged(binary):
    table = binary[3]["skin_tone"]
    tiny = table["groups"]["VI"]
    assert tiny["count"] == 10 and not tiny["sufficient"] and table["insufficient"] == ["VI"]
    assert tiny["metrics"]["accuracy"]["value"] == 0.0  # reported, terrible ...
    assert all(f["group"] != "VI" for f in table["flags"])  # ... and still not judged
    judged = [e["metrics"]["accuracy"]["value"] for g, e in table["groups"].items() if g != "VI"]
    assert table["differences"]["accuracy"] == pytest.approx(max(judged) - min(judged))
    assert table["ratios"]["accuracy"] == pytest.approx(min(judged) / max(judged))
    assert "VI" not in table["disparity"]["groups_compared"]


def test_intervals_contain_the_point_value_and_shrink_with_n(binary):
    for attribute in binary[3].values():
        for entry in attribute["groups"].values():
            for metric in entry["metrics"].values():
                if metric["ci"] is not None:
                    assert metric["ci"][0] <= metric["value"] <= metric["ci"][1]
    # Same accuracy (0.8) at 50 and 2,000 samples: the bootstrap width follows the binomial √(p(1−p)/n).
    y_true = np.zeros(2050, dtype=int)
    y_pred = np.r_[np.zeros(40), np.ones(10), np.zeros(1600), np.ones(400)].astype(int)
    groups = np.r_[["small"] * 50, ["large"] * 2000]
    table = assess_fairness(y_true, y_pred, {"g": groups}, labels=[0, 1], n_boot=1000)["g"]
    widths = {}
    for name, n in (("small", 50), ("large", 2000)):
        low, high = table["groups"][name]["metrics"]["accuracy"]["ci"]
        widths[name] = high - low
        assert widths[name] == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / n), rel=0.25)
    assert widths["large"] < widths["small"] / 4


def test_binary_disparity_is_fairlearns_over_the_sufficient_groups(binary):
    y_true, y_pred, features, table = binary
    for attribute in ("skin_tone", "sex"):
        keep = features[attribute] != "VI"  # VI is the only group below min_group_size
        groups = features[attribute][keep]
        expected = {f.__name__: f(y_true[keep], y_pred[keep], sensitive_features=groups)
                    for f in (demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference,
                              equalized_odds_ratio)}
        for name, value in expected.items():
            assert table[attribute]["disparity"][name] == pytest.approx(value, abs=1e-12)


def test_intersections_are_named_with_the_multiplication_sign(binary):
    y_true, y_pred, features, table = binary
    assert list(table) == ["skin_tone", "sex", "skin_tone×sex"]
    assert "V×female" in table["skin_tone×sex"]["groups"]
    assert list(assess_fairness(y_true, y_pred, features, intersections=False)) == ["skin_tone", "sex"]


def _federated_sites(monkeypatch, tmp_path, **policy):
    """Three sites whose "model" predicts what their data says; each evaluates under ``policy`` and the
    coordinator sums their replies (after the same JSON trip as the Flower messages)."""
    import torch

    import fedvision.site as site_module
    from fedvision.config import RunConfig
    from fedvision.data.dataset import LoadedDataset
    from fedvision.privacy import SitePolicy
    from fedvision.federation import federated_evaluation
    from fedvision.messages import EvaluateReply
    from fedvision.train import EvalResult

    def predictions_as_evaluation(model, dataset):  # the site's "model" predicts what the dataset says
        y_true, y_pred = (t.numpy() for t in dataset.tensors)
        return EvalResult(loss=0.0, accuracy=float(np.mean(y_true == y_pred)), num_examples=len(y_true),
                          y_true=y_true, y_pred=y_pred)

    monkeypatch.setattr(site_module, "evaluate", predictions_as_evaluation)
    monkeypatch.setattr(site_module.Site, "model", lambda self, state=None: None)
    run = RunConfig.from_mapping({"sensitive": "skin_tone,sex"})
    rng = np.random.default_rng(7)
    pooled, replies = [], []
    for name, n in (("site-1", 300), ("site-2", 180), ("site-3", 45)):
        y_true = rng.integers(0, 2, n)
        y_pred = np.where(rng.random(n) < 0.8, y_true, 1 - y_true)
        features = pd.DataFrame({"skin_tone": rng.choice(["I", "III", "V"], n, p=[0.5, 0.4, 0.1]),
                                 "sex": rng.choice(["female", "male"], n)})
        test = LoadedDataset(dataset=torch.utils.data.TensorDataset(torch.tensor(y_true), torch.tensor(y_pred)),
                             attributes=features, classes=["benign", "malignant"])
        site = site_module.Site(name=name, train_data=test, test_data=test, state_dir=tmp_path / name, run=run,
                                policy=SitePolicy(dp=True, epsilon_budget=8.0, delta=1e-5, simulated=True, **policy))
        result = site.evaluate({}, server_round=1)
        groups, classes = json.loads(json.dumps(result.pop("groups"))), json.loads(json.dumps(result.pop("classes")))
        replies.append(EvaluateReply(site=name, metrics=result, groups=groups, classes=classes))
        pooled.append(features.assign(site=name, y_true=y_true, y_pred=y_pred))
    return json.loads(json.dumps(federated_evaluation(replies))), pd.concat(pooled, ignore_index=True)


def test_federated_table_from_exact_site_counts_equals_the_pooled_table(monkeypatch, tmp_path):
    """Sites that chose exact release: the table from their counts equals the table from the pooled predictions."""
    evaluation, data = _federated_sites(monkeypatch, tmp_path, exact_evaluation=True)
    federated = assess_fairness_from_confusion(evaluation["group_confusion"], evaluation["classes"], seed=3)

    names = {"labels": [0, 1], "class_names": ["benign", "malignant"], "seed": 3}
    expected = {**assess_fairness(data["y_true"], data["y_pred"], data[["skin_tone", "sex"]], **names),
                **assess_fairness(data["y_true"], data["y_pred"], data[["site"]], **names)}
    assert set(federated) == {"skin_tone", "sex", "skin_tone×sex", "site"}
    assert federated == expected  # every number, intervals included
    assert federated["site"]["insufficient"] == []  # site-3 has 45 ≥ 30 samples
    json.dumps(federated, allow_nan=False)  # plain JSON, no NaN
    assert evaluation["count_noise_std"] == 0.0


def test_federated_counts_are_released_with_charged_noise_and_intervals_that_cover_it(monkeypatch, tmp_path):
    """By default every count carries Gaussian noise of std σ·√T (T tables, one cell each per record), σ calibrated
    over the run's planned evaluations within the evaluation records' allotment and charged to each site's ledger
    as its own record set before release. The federated intervals widen to cover the noise."""
    from fedvision.privacy import EVALUATION, PrivacyLedger

    evaluation, data = _federated_sites(monkeypatch, tmp_path, evaluation_epsilon=1.0)
    exact, _ = _federated_sites(monkeypatch, tmp_path / "exact", exact_evaluation=True)
    tables = 4  # skin_tone, sex, skin_tone×sex, site
    for name in ("site-1", "site-2", "site-3"):
        ledger = PrivacyLedger(tmp_path / name / "ledger.json")
        (entry,) = ledger.entries
        assert entry["records"] == EVALUATION and entry["tables"] == tables and entry["randomness"] == SECRET_SOURCE
        sigma = entry["noise_multiplier"]
        # Calibrated for the run's 3 planned evaluations to reach the allotment ε = 1; one of them released.
        assert 0.95 <= epsilon_of([(sigma, 1.0, 1)] * 3, 1e-5) <= 1.0
        assert ledger.epsilon(1e-5, EVALUATION) == pytest.approx(epsilon_of([(sigma, 1.0, 1)], 1e-5))
        assert ledger.epsilon(1e-5) == 0.0, "the training records' set is untouched"
    std = sigma * math.sqrt(tables) * math.sqrt(3)  # three sites' independent noise summed
    assert evaluation["count_noise_std"] == pytest.approx(std, rel=0.05)
    noise = np.concatenate([np.ravel(np.asarray(evaluation["group_confusion"][a][g]) -
                                     np.asarray(exact["group_confusion"][a][g]))
                            for a in exact["group_confusion"] for g in exact["group_confusion"][a]])
    assert 0.6 * std <= noise.std() <= 1.4 * std, "the released counts carry noise of the stated size"
    noisy = assess_fairness_from_confusion(evaluation["group_confusion"], evaluation["classes"], seed=3,
                                           count_noise_std=evaluation["count_noise_std"])
    plain = assess_fairness_from_confusion(exact["group_confusion"], exact["classes"], seed=3)
    width = lambda t: t["metrics"]["accuracy"]["ci"][1] - t["metrics"]["accuracy"]["ci"][0]
    assert width(noisy["sex"]["overall"]) > width(plain["sex"]["overall"])
    assert "DP" in noisy["sex"]["params"]["method"]


@pytest.mark.parametrize("call, error, argument", [
    (lambda y, p, f: assess_fairness(y, p[:-1], f), DataError, "y_pred"),
    (lambda y, p, f: assess_fairness([], [], {"sex": []}), DataError, "y_true"),
    (lambda y, p, f: assess_fairness(y, p, f.iloc[:-1]), DataError, "sensitive_features['skin_tone']"),
    (lambda y, p, f: assess_fairness(y, p, f, min_group_size=0), ConfigError, "min_group_size"),
    (lambda y, p, f: assess_fairness(y, p, f, ratio_bounds=(1.25, 0.8)), ConfigError, "ratio_bounds"),
    (lambda y, p, f: assess_fairness(y, p, f, confidence=1.5), ConfigError, "confidence"),
    (lambda y, p, f: assess_fairness(y, p, f, n_boot=-1), ConfigError, "n_boot"),
    (lambda y, p, f: assess_fairness(y, p, [1, 2]), ConfigError, "sensitive_features"),
    (lambda y, p, f: assess_fairness(y, p, f, labels=[0]), DataError, "labels"),
    (lambda y, p, f: assess_fairness_from_confusion({"sex": {"female": [[1, 2]]}}, ["a", "b"]), DataError,
     "group_confusion['sex']['female']"),
    (lambda y, p, f: assess_fairness_from_confusion({"sex": {"female": [[1, -2], [0, 1]]}}, ["a", "b"]), DataError,
     "group_confusion['sex']['female']"),
    (lambda y, p, f: assess_fairness_from_confusion({}, ["a", "b"]), DataError, "group_confusion"),
])
def test_bad_input_fails_with_one_line_naming_the_argument(call, error, argument):
    y_true, y_pred, features = planted()
    with pytest.raises(error) as info:
        call(y_true, y_pred, features)
    message = str(info.value)
    assert message.startswith(argument) and "\n" not in message
