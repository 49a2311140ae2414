"""Empirical privacy auditing: statistical lower bounds on the epsilon of a DP engine.

``python -m privacy.audit --out DIR`` (see :mod:`privacy.audit.cli`) runs the
engine under test on canaries and reports, for each canary kind and
estimator, a lower bound on epsilon with its confidence next to the
accountant's epsilon. The pieces, each usable alone:

- :mod:`~privacy.audit.estimators`: scores -> lower bounds (one run, many runs, GDP);
- :mod:`~privacy.audit.tight`: fixed-rule mistakes -> the tight bound against the claimed family;
- :mod:`~privacy.audit.canaries`: tiny models, canaries and attack scores;
- :mod:`~privacy.audit.training`: one training run through the engine's public API;
- :mod:`~privacy.audit.ranks`: simulated ranks behind the engine's reducer hook;
- :mod:`~privacy.audit.runner`: one audit point (all kinds and estimators at one sigma).
"""

from privacy.audit.estimators import clopper_pearson_upper, gdp_epsilon, many_runs_epsilon, one_run_epsilon
from privacy.audit.runner import Plan, audit_point, verdict
from privacy.audit.tight import bayes_error, family_epsilon
from privacy.audit.training import Mechanism, train_private

__all__ = ["Plan", "Mechanism", "audit_point", "verdict", "train_private", "one_run_epsilon", "many_runs_epsilon",
           "clopper_pearson_upper", "gdp_epsilon", "bayes_error", "family_epsilon"]
