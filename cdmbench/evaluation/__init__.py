"""Evaluation: samples for evaluation, metrics, classifiers, CAS, level sweeps, CDM's findings."""
