"""MLflow "models from code" file of the QMagFace scorer; MLflow executes it to build the model.

Logged models store a copy of this file next to the calibration JSON. It is not imported by
the package: importing it registers the model object with MLflow (``set_model``).
"""

import mlflow.models

from qmag_ray.tracking.scorer import QMagFaceScorerModel

mlflow.models.set_model(QMagFaceScorerModel())
