"""Reference values for the evaluation tests: scikit-learn's AUC and statsmodels' Wilson intervals.

Reads one JSON object on stdin:
    {"auc": [{"scores": [...], "labels": [true, false, ...]}, ...],
     "wilson": [{"successes": k, "n": n}, ...]}
and prints one JSON object on stdout:
    {"auc": [value or null, ...], "wilson": [[lo, hi] or null, ...], "versions": {...}}
where null means the library refuses the case (one class only; n = 0).
"""

import json
import sys

import numpy as np
import scipy
import sklearn
import statsmodels
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint


def auc(case):
    labels = np.asarray(case["labels"], dtype=bool)
    scores = np.asarray(case["scores"], dtype=float)
    # roc_auc_score raises on a single class; the Rust side returns None there.
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def wilson(case):
    n = case["n"]
    if n == 0:
        return None
    lo, hi = proportion_confint(case["successes"], n, alpha=0.05, method="wilson")
    return [float(lo), float(hi)]


def main():
    request = json.load(sys.stdin)
    json.dump(
        {
            "auc": [auc(c) for c in request.get("auc", [])],
            "wilson": [wilson(c) for c in request.get("wilson", [])],
            "versions": {
                "python": sys.version.split()[0],
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "scikit-learn": sklearn.__version__,
                "statsmodels": statsmodels.__version__,
            },
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
