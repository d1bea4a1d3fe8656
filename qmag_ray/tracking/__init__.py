"""MLflow tracking and registry: recorded runs, the pyfunc scorer, aliases and the promotion gate.

Modules: ``uri`` (tracking URI and reachability), ``sanitize`` (no credentials recorded),
``runs`` (run logging), ``scorer`` (the pyfunc model) and ``pyfunc_entry`` (its models-from-code
file), ``registry`` (versions and aliases), ``consumer`` (loading the scorer in services),
``gate`` (champion/challenger decision, pure Python), ``promotion`` (the gate applied to the
registry). Scheduled recalibration, which drives these, is a workflow
(``qmag_ray.workflows.recalibrate``). Nothing is imported here: MLflow loads only when a module
that needs it is used.
"""
