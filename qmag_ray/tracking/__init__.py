"""MLflow tracking and registry: recorded runs, the pyfunc scorer, aliases and the promotion gate.

Modules: ``uri`` (tracking URI and reachability), ``sanitize`` (no credentials recorded),
``runs`` (run logging), ``scorer`` (the pyfunc model), ``registry`` (versions and aliases),
``consumer`` (loading the scorer in services), ``gate`` (champion/challenger decision, pure
Python). Nothing is imported here: MLflow loads only when a module that needs it is used.
"""
