"""Prefect flows and deployments (layer: pipelines, the top): thin orchestration over `dcgan` and `preprocessing`."""
