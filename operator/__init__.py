"""Control plane: the kopf operator that reconciles LLMDeployment resources (installed as tideserve.operator)."""
