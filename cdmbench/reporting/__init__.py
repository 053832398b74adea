"""Reporting: result rows to tables, plots and report.md."""
