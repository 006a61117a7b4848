"""DIS / SOD evaluation metrics, exactly as the field computes them (numpy + OpenCV).

``MetricAccumulator`` / ``evaluate_pairs`` give the dataset values reported in the BiRefNet and
DIS5K papers: Sm, MAE, max/mean/adaptive F-measure, weighted F-measure, max/mean/adaptive
E-measure and the relaxed HCE. See ``shared/reference/metrics/README.md`` for the conventions.
"""

from birefnet_jax.metrics.evaluation import (CURVE_KEYS, METRIC_KEYS, MetricAccumulator,
                                             evaluate_pairs, image_metrics, iter_image_metrics,
                                             match_prediction, read_gray)
from birefnet_jax.metrics.hce import hce_components, human_correction_effort
from birefnet_jax.metrics.skeleton import skeletonize
