"""Data-driven pruning: sample what layers see on calibration data (``collect``), choose channels
by their effect on the consumers' outputs (``select``: LASSO, ThiNet greedy), refit the consumers
by least squares (``reconstruct``), group by group in producer order (``sequential``)."""
