"""Tables and plots of the experiments: python experiments/report.py (after experiments/run.sh)."""
print("report: not written yet")
