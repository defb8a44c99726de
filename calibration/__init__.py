"""GPU probes on random-weight replicas of a model, the fit of the estimator's coefficients, stored results."""
