"""probescope's benchmark suites: ``python -m benchmarks [SUITE ...] [--quick] [--device] [--out]``.

Every suite compares implementations on the same inputs in one run and reports ratios; no
suite asserts on time. Results go to a table on the terminal, a JSON file and a plot.
"""
