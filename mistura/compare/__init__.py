"""The comparison study: several models, one data set, one budget, one schedule (`mistura compare`).

- suite.py: the runs to compare, from a suite YAML or several run configs, checked to share
  data, schedule and sequence length
- counts.py: parameters and training FLOPs per token, and matching them across runs
- runner.py: train every run in its own process, skip finished ones, resume the unfinished
- worker.py: one run in that process: train, sample, measure
- metrics.py: the metrics JSON of a run
- plots.py: convergence and expert-utilisation figures
- report.py: report.md, with the table, the summary, the plots and the samples

In Python: `compare(load_suite(["configs/suites/seed004.yaml"]), "results")`, with `compare`
from mistura.compare.runner and `load_suite` from mistura.compare.suite. This file imports
neither, so that `python -m mistura.compare.worker` loads the worker module only once.
"""
