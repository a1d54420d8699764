"""Monitoring: the prediction log, drift reports, per-slice metrics, OOD flags, drift gauges.

Request-path pieces (numpy + sqlite3 only, no pandas or evidently; the service imports these):
  ``store.PredictionLog`` / ``store.PredictionRecord``  durable log of answers and feedback
  ``slices.SliceRules``                                  allowed slice keys and values
  ``ood.OODScorer`` / ``ood.fit_ood``                    OOD score and flag per answer
  ``reference.load_reference``                           a model version's validation profile
  ``exporter.DriftGauges`` / ``exporter.DriftCollector`` latest drift scores for Prometheus

Report pieces (pandas; evidently only in ``drift``): ``drift.drift_report``,
``slice_metrics.slice_metrics``, and the commands in ``__main__`` (``python -m monitoring``).

Nothing is imported here, so ``import monitoring.store`` stays light.
"""
