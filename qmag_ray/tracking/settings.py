"""Settings of the tracking stage: where runs are recorded and how scorers are registered."""

from __future__ import annotations

from qmag_ray.config import Settings, option, settings


@settings
class TrackingConfig(Settings):
    """Where the run is recorded."""

    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    )
    experiment: str = option("qmag-ray", "MLflow experiment of the run.", min_length=1)


@settings
class RegisteredModel(Settings):
    """The registered model the scorer versions belong to."""

    register_as: str = option(
        "qmagface", "Registered model name of the scorer in the MLflow registry.", min_length=1
    )


@settings
class RegistrationConfig(RegisteredModel):
    """Whether the fitted scorer is registered, and the alias it gets.

    The rule itself (registered only when the held-out guard did not fail; which tags; when
    the alias moves) is ``qmag_ray.tracking.policy``.
    """

    register: bool = option(True, "Register the fitted scorer (only if the guard passes).")
    alias: str | None = option(
        None,
        "Alias to point at the new version when the held-out guard passes (e.g. champion); "
        "without it a first version becomes champion when there is none yet.",
    )


@settings
class CalibrateTrackingConfig(TrackingConfig, RegistrationConfig):
    """Tracking plus registration of the fitted scorer."""
