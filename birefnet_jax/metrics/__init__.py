"""DIS / SOD evaluation metrics, exactly as the field computes them (numpy + OpenCV).

``MetricAccumulator`` / ``evaluate_pairs`` give the dataset values reported in the BiRefNet and
DIS5K papers: Sm, MAE, max/mean/adaptive F-measure, weighted F-measure, max/mean/adaptive
E-measure, the relaxed HCE and the boundary metrics mBA and BIoU (max / mean). See
``shared/reference/metrics/README.md`` for the conventions and ``boundary.py`` for mBA / BIoU.
"""

from birefnet_jax.metrics.evaluation import (CURVE_KEYS, METRIC_KEYS, MetricAccumulator,
                                             evaluate_pairs, image_metrics, iter_image_metrics,
                                             match_prediction, read_gray)
from birefnet_jax.metrics.boundary import boundary_accuracy, boundary_iou_curve
from birefnet_jax.metrics.hce import hce_components, human_correction_effort
from birefnet_jax.metrics.skeleton import skeletonize
