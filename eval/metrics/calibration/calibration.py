"""`evaluate` metric module for calibration: accuracy, ECE, NLL and Brier from predictive probabilities.

Load it with ``evaluate.load("eval/metrics/calibration")`` (the folder path). The numbers come from
``ivon_lora.evaluation.metrics`` — this module only adapts that implementation to the ``evaluate`` API,
which has no stock metric for ECE, NLL or Brier.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from ivon_lora.evaluation.metrics import compute_metrics

_DESCRIPTION = """
Accuracy and calibration of a classifier's predictive probabilities, as reported in the IVON-LoRA papers:
accuracy (percent), expected calibration error over 10 equal-width confidence bins (percent), negative
log-likelihood of the label (nats) and the Brier score (sum over classes, not divided by their number).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one probability vector per example, over the same C classes
        (rows must sum to 1: pass softmax outputs, averaged over posterior samples if there are several).
    references (`list` of `int`): the index of the correct class of each example.
    n_bins (`int`, defaults to 10): number of equal-width confidence bins for ECE; bin i is (i/n, (i+1)/n].
Returns:
    acc (`float`): percent of examples whose most probable class is the reference.
    ece (`float`): expected calibration error, in percent.
    nll (`float`): mean negative log-probability of the reference, in nats.
    brier (`float`): mean over examples of the summed squared error to the one-hot reference.
    n (`int`): number of examples.
Examples:
    >>> calibration = evaluate.load("eval/metrics/calibration")
    >>> calibration.compute(predictions=[[0.9, 0.1], [0.3, 0.7]], references=[0, 0])
    {'acc': 50.0, 'ece': 40.0, 'nll': 0.6546..., 'brier': 0.4999..., 'n': 2}
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={International Conference on Machine Learning},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Calibration(evaluate.Metric):
    """ACC / ECE / NLL / Brier of predictive probabilities."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[list[float]], references: list[int], n_bins: int = 10) -> dict[str, float]:
        return compute_metrics(np.asarray(predictions, dtype=np.float64), np.asarray(references), n_bins=n_bins)
