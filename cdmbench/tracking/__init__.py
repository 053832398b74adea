"""Experiment trackers: the recipe's ``log_to`` loggers, opened for a command and fed what the run
directory records (training rows, result rows, sample grids)."""
