"""Offline evaluation (`propensity evaluate`): the models against baselines and, on the demo shop, the oracle.

run          fit as training does, score the test period, write the report (the command)
propensity_scores / ranking    the test rows and test buyers, scored by every model and baseline
comparison   paired bootstrap differences and verdicts; goals: what each dataset is held to
oracle       the demo generator's true probabilities as a ceiling
fairness     per-segment metrics and exposure, with and without the sensitive attributes
report / summary    report.md per dataset; metrics.json and the README headline
"""

from training.evaluation.run import cmd_evaluate, evaluate
from training.evaluation.summary import write_summary

__all__ = ["cmd_evaluate", "evaluate", "write_summary"]
