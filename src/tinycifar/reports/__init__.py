"""Reports on finished runs: the run report, comparisons of several runs, corruption robustness."""
