"""Face-verification metrics over embeddings and pair lists (numpy, scikit-learn; no torch).

InsightFace's protocol (10-fold accuracy, VAL@FAR, ROC) in :mod:`evaluation.verification`;
IJB-B / IJB-C template verification (media then template pooling, TPR@FPR) in
:mod:`evaluation.ijb`; JSON / ROC-plot / table output in :mod:`evaluation.report`.

>>> from evaluation import evaluate, format_table
>>> # result = evaluate(embeddings, issame); print(format_table({"lfw": result}))
"""
from .report import (format_table, issame_path, save_roc_png, table_row, write_ijb_report,
                     write_json_report, write_report)
from .verification import (ACC_THRESHOLDS, VAL_THRESHOLDS, VerificationResult, calculate_roc,
                           calculate_val, count_below, evaluate, l2_normalize, pair_distances,
                           threshold_at_far)

__all__ = ["ACC_THRESHOLDS", "VAL_THRESHOLDS", "VerificationResult", "calculate_roc",
           "calculate_val", "count_below", "evaluate", "format_table", "issame_path", "l2_normalize",
           "pair_distances", "save_roc_png", "table_row", "threshold_at_far",
           "write_ijb_report", "write_json_report", "write_report"]
