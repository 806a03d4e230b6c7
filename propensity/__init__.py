"""propensity: purchase propensity and recommendations from Feast features and LightGBM models."""

# Import prometheus_client before anything imports feast: `import feast` sets
# PROMETHEUS_MULTIPROC_DIR to a temporary directory of its own, and prometheus_client, if imported
# after that, would store every metric of this process in that directory's files.
import prometheus_client  # noqa: F401
