"""Reference metric values from scikit-learn on fixed random inputs (run once; output committed).

    .venv/bin/pip install torch==2.11.0 scikit-learn
    .venv/bin/python scripts/make_metric_fixtures.py
"""
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score,
                             recall_score, roc_auc_score)

rng = np.random.default_rng(0)
cases = []


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


for task, k, n in [("binary", 2, 60), ("multiclass", 4, 80), ("ordinal", 5, 90)]:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    p = softmax(logits)
    pred = p.argmax(1)
    m = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro"),
    }
    if k == 2:
        m["auc"] = roc_auc_score(y, p[:, 1])
        m["sensitivity"] = recall_score(y, pred, pos_label=1)
        m["specificity"] = recall_score(y, pred, pos_label=0)
    else:
        m["auc"] = roc_auc_score(y, p, multi_class="ovr", average="macro")
    if task == "ordinal":
        m["kappa"] = cohen_kappa_score(y, pred, weights="quadratic")
    cases.append({"task": task, "truth": [[float(v)] for v in y], "probs": p.tolist(), "expected": m})

# Multi-label: per-label macro AUC, element accuracy, macro F1 at 0.5.
n, k = 70, 3
y = (rng.random((n, k)) < 0.4).astype(float)
p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.2 * (2 * y - 1) * rng.random((n, 1)))))
m = {
    "auc": roc_auc_score(y, p, average="macro"),
    "accuracy": float(((p > 0.5) == (y > 0.5)).mean()),
    "f1": f1_score(y, p > 0.5, average="macro"),
}
cases.append({"task": "multilabel", "truth": y.tolist(), "probs": p.tolist(), "expected": m})

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "metrics_sklearn.json")
with open(out, "w") as f:
    json.dump({"sklearn": sklearn.__version__, "cases": cases}, f)
print("sklearn", sklearn.__version__)
