"""The autoscaler's pure core: SLO math, the performance model, the seasonal forecaster and the policy.

No I/O here: the operator, the local runtime and the simulator feed it observations and apply its decisions.
"""
