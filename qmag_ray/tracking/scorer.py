"""The calibrated QMagFace scorer as an MLflow pyfunc model: JSON calibration + package code.

The model is logged "from code" (``pyfunc_entry.py`` of this package is the model file), so
the stored model holds the calibration JSON and that short file, never a pickle; loading it
needs only qmag-ray installed. ``score_frame`` is the scoring logic itself, shared by the
pyfunc, the service helper in ``consumer`` and tests.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from qmag_ray import __version__
from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.scores import cosine as row_cosine
from qmag_ray.scores import norms, pair_quality

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

DEFAULT_FMR = 1e-3
PARAMS = ("fmr", "quality")
COSINE_SLACK = 1e-6  # rounding of a computed cosine; anything further out is not a cosine
EMBEDDING_COLUMNS = ("embedding_a", "embedding_b")
SCORE_COLUMNS = ("cosine", "quality_a", "quality_b")
OUTPUT_COLUMNS = ("score", "cosine", "quality", "match")
CALIBRATION_ARTIFACT = "calibration"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")


class ScoringError(ValueError):
    """Input the scorer cannot score; the message names the column and row."""


def expected_quality(calibration: QMagFaceCalibration) -> str:
    """The per-image quality the calibration was fitted on (``quality``: the MagFace norm)."""
    return str(calibration.extra.get("quality_column", "quality"))


def _check_finite(name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0])
        raise ScoringError(f"column {name!r} has NaN or infinite values, first in row {row}")


def _column_matrix(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A list-per-row column as an (n, d) array; ragged or non-numeric rows are errors."""
    rows = []
    for i, value in enumerate(frame[name].tolist()):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ScoringError(f"column {name!r} row {i} is not a list of numbers") from None
        if arr.ndim != 1:
            raise ScoringError(
                f"column {name!r} row {i} must be a flat list of numbers, got shape {arr.shape}"
            )
        rows.append(arr)
    if len({len(r) for r in rows}) > 1:
        first = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
        raise ScoringError(
            f"column {name!r} mixes embedding sizes: row 0 has {len(rows[0])} values, "
            f"row {first} has {len(rows[first])}"
        )
    return np.stack(rows) if rows else np.zeros((0, 0))


def _column_vector(frame: pd.DataFrame, name: str) -> np.ndarray:
    try:
        return np.asarray(frame[name].tolist(), dtype=np.float64)
    except (TypeError, ValueError):
        raise ScoringError(f"column {name!r} must hold numbers") from None


def check_fmr(calibration: QMagFaceCalibration, fmr: Any) -> tuple[float, float]:
    """(fmr, threshold) of a requested operating point; a ``ScoringError`` when unavailable."""
    try:
        value = float(fmr)
    except (TypeError, ValueError):
        raise ScoringError(f"parameter 'fmr' must be a number, got {fmr!r}") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise ScoringError(f"parameter 'fmr' must lie in (0, 1), got {fmr!r}")
    try:
        return value, calibration.threshold_at(value)
    except KeyError as exc:
        raise ScoringError(str(exc.args[0])) from None


def embedding_scores(
    calibration: QMagFaceCalibration, embedding_a: Any, embedding_b: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, pair quality) of row-wise pairs of unnormalised embeddings, validated."""
    a = np.asarray(embedding_a, dtype=np.float64)
    b = np.asarray(embedding_b, dtype=np.float64)
    for name, arr in zip(EMBEDDING_COLUMNS, (a, b), strict=True):
        if arr.ndim != 2:
            raise ScoringError(f"{name} must be an (n, d) array of embeddings, got {arr.shape}")
    expected = calibration.extra.get("embedding_dim")
    for name, arr in zip(EMBEDDING_COLUMNS, (a, b), strict=True):
        if expected is not None and len(arr) and arr.shape[1] != int(expected):
            raise ScoringError(
                f"column {name!r} has embeddings of size {arr.shape[1]}; this calibration "
                f"was fitted on embeddings of size {int(expected)}"
            )
    if len(a) != len(b):
        raise ScoringError(f"embedding_a has {len(a)} rows but embedding_b has {len(b)}")
    if len(a) and a.shape[1] != b.shape[1]:
        raise ScoringError(
            f"embedding_a has size {a.shape[1]} but embedding_b has size {b.shape[1]}"
        )
    if not len(a):
        return np.zeros(0), np.zeros(0)
    for name, arr in zip(EMBEDDING_COLUMNS, (a, b), strict=True):
        _check_finite(name, arr)
        zero = np.flatnonzero(norms(arr) == 0)
        if zero.size:
            raise ScoringError(
                f"column {name!r} row {int(zero[0])} is an all-zero embedding (no direction)"
            )
    return row_cosine(a, b), pair_quality(norms(a), norms(b))


def cosine_scores(cosine: Any, quality_a: Any, quality_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, pair quality) from given cosine scores and the two faces' qualities, validated."""
    values = {
        name: np.asarray(v, dtype=np.float64).reshape(-1)
        for name, v in zip(SCORE_COLUMNS, (cosine, quality_a, quality_b), strict=True)
    }
    lengths = {name: len(v) for name, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise ScoringError(f"cosine, quality_a and quality_b differ in length: {lengths}")
    for name, arr in values.items():
        _check_finite(name, arr)
    outside = np.flatnonzero(np.abs(values["cosine"]) > 1 + COSINE_SLACK)
    if outside.size:
        raise ScoringError(
            f"column 'cosine' row {int(outside[0])} lies outside [-1, 1]; a cosine similarity "
            f"cannot ({outside.size} row(s) in all)"
        )
    for name in ("quality_a", "quality_b"):
        bad = np.flatnonzero(values[name] <= 0)
        if bad.size:
            row = int(bad[0])
            what = "negative" if values[name][row] < 0 else "zero"
            raise ScoringError(
                f"column {name!r} row {row} is {what}; a quality is an embedding norm and "
                "must be > 0"
            )
    return values["cosine"], pair_quality(values["quality_a"], values["quality_b"])


def apply_threshold(
    calibration: QMagFaceCalibration, cos: np.ndarray, quality: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Output columns: QMagFace score, cosine, quality and ``match = score >= threshold``."""
    score = calibration.score(cos, quality)
    return {"score": score, "cosine": cos, "quality": quality, "match": score >= threshold}


def _name(column: Any) -> str:
    text = str(column)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def check_params(params: Any) -> Any:
    """The ``fmr`` of a params mapping; unknown parameters are an error (a 400 over REST)."""
    if params is None:
        return DEFAULT_FMR
    if not isinstance(params, dict):
        raise ScoringError(f"params must be a mapping, got {type(params).__name__}")
    unknown = [k for k in params if k not in PARAMS]
    if unknown:
        raise ScoringError(
            f"unknown parameter(s) {', '.join(_name(k) for k in unknown[:5])}; the scorer takes "
            f"{', '.join(PARAMS)}"
        )
    return params.get("fmr", DEFAULT_FMR)


def score_frame(
    calibration: QMagFaceCalibration, frame: pd.DataFrame, *, fmr: Any = DEFAULT_FMR
) -> pd.DataFrame:
    """Score a table of comparisons; the columns and semantics of the pyfunc model.

    ``frame`` has either ``embedding_a`` and ``embedding_b`` (unnormalised embeddings, one
    list per row) or ``cosine``, ``quality_a`` and ``quality_b``. The result has ``score``
    (QMagFace), ``cosine``, ``quality`` (min of the two norms) and ``match``
    (``score >= threshold`` of the calibration at ``fmr``).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ScoringError(f"expected a table (pandas DataFrame), got {type(frame).__name__}")
    _, threshold = check_fmr(calibration, fmr)
    columns = set(frame.columns)
    unknown = [c for c in frame.columns if c not in (*EMBEDDING_COLUMNS, *SCORE_COLUMNS)]
    if unknown:
        raise ScoringError(
            f"unknown column(s) {', '.join(_name(c) for c in unknown[:5])}"
            f"{f' (and {len(unknown) - 5} more)' if len(unknown) > 5 else ''}; the input takes "
            f"either {', '.join(EMBEDDING_COLUMNS)} or {', '.join(SCORE_COLUMNS)}"
        )
    has_embeddings = any(c in columns for c in EMBEDDING_COLUMNS)
    has_scores = any(c in columns for c in SCORE_COLUMNS)
    if has_embeddings and has_scores:
        raise ScoringError(
            "give either embedding_a, embedding_b or cosine, quality_a, quality_b, not both"
        )
    wanted = EMBEDDING_COLUMNS if has_embeddings else SCORE_COLUMNS
    missing = [c for c in wanted if c not in columns]
    if missing or not (has_embeddings or has_scores):
        raise ScoringError(
            f"missing column(s) {', '.join(missing or wanted)}; the input needs either "
            f"{', '.join(EMBEDDING_COLUMNS)} or {', '.join(SCORE_COLUMNS)} "
            f"(got: {', '.join(map(str, frame.columns)) or 'no columns'})"
        )
    if has_embeddings and expected_quality(calibration) != "quality":
        raise ScoringError(
            f"this scorer was fitted on the quality {expected_quality(calibration)!r}, not on "
            "the embedding norm: give cosine, quality_a and quality_b with that quality"
        )
    if has_embeddings:
        a, b = (_column_matrix(frame, name) for name in EMBEDDING_COLUMNS)
        if not len(frame):
            a = b = np.zeros((0, 1))
        cos, quality = embedding_scores(calibration, a, b)
    else:
        cos, quality = cosine_scores(*(_column_vector(frame, name) for name in SCORE_COLUMNS))
    out = apply_threshold(calibration, cos, quality, threshold)
    return pd.DataFrame(out, columns=OUTPUT_COLUMNS)


def _input_error(text: str) -> Exception:
    """An MLflow 400 error whose message stays ``text``.

    MLflow's scoring server rewrites the message of an ``MlflowException`` raised by
    ``predict`` to ``Failed to predict data '<the whole input>'...``, which would echo every
    vector of the request; this exception keeps its own message (the assignment is ignored).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class InputError(MlflowException):
        @property  # type: ignore[override]
        def message(self) -> str:
            return text

        @message.setter
        def message(self, value: str) -> None:
            pass

    return InputError(text, error_code=INVALID_PARAMETER_VALUE)


# MLflow's pyfunc wrapper (``PyFuncModel._predict`` -> ``mlflow.models.utils.
# _enforce_params_schema``) drops params that the signature does not declare, with only a
# warning on this logger, before ``predict`` is called: ``predict`` never sees them. That
# warning is emitted in the same prediction context (``mlflow.pyfunc.context``, one per
# ``PyFuncModel.predict`` call) as the ``predict`` call that follows, so a filter on the logger
# marks the context and ``predict`` refuses the request. tests/test_mlflow_server.py proves it
# against ``mlflow models serve`` (and fails if MLflow changes the warning).
ENFORCE_LOGGER = "mlflow.models.utils"
_IGNORED_PARAMS = re.compile(r"Unrecognized params (\[.*?\]) are ignored")
_CONTEXT_MARK = "_qmag_unknown_params"


class _UnknownParamsFilter(logging.Filter):
    """Marks the current prediction context with the params MLflow is about to ignore."""

    def filter(self, record: logging.LogRecord) -> bool:
        from mlflow.pyfunc.context import get_prediction_context

        found = _IGNORED_PARAMS.search(record.getMessage())
        context = get_prediction_context()
        if found and context is not None:
            try:
                keys = [str(k) for k in ast.literal_eval(found.group(1))]
            except (ValueError, SyntaxError):
                keys = ["(unreadable)"]
            setattr(context, _CONTEXT_MARK, sorted(keys))
        return True  # MLflow's own warning is still logged


def _watch_ignored_params() -> None:
    """Install the filter once per process (a model loaded twice shares it)."""
    enforce = logging.getLogger(ENFORCE_LOGGER)
    if not any(isinstance(f, _UnknownParamsFilter) for f in enforce.filters):
        enforce.addFilter(_UnknownParamsFilter())
    if not enforce.isEnabledFor(logging.WARNING):  # the filter only runs for emitted records
        enforce.setLevel(logging.WARNING)


def _ignored_params() -> list[str]:
    """Params of the current request that MLflow dropped before ``predict`` (see above)."""
    from mlflow.pyfunc.context import get_prediction_context

    return list(getattr(get_prediction_context(), _CONTEXT_MARK, None) or [])


class QMagFaceScorerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: reads the calibration JSON in ``load_context``, scores in ``predict``."""

    calibration: QMagFaceCalibration | None = None

    def load_context(self, context: Any) -> None:
        self.calibration = QMagFaceCalibration.from_file(context.artifacts[CALIBRATION_ARTIFACT])
        _watch_ignored_params()

    # pd.DataFrame is a hint MLflow accepts without deriving a signature from it.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        if self.calibration is None:
            raise MlflowException("the scorer's calibration was not loaded (load_context)")
        dropped = _ignored_params()
        if dropped:
            try:
                check_params(dict.fromkeys(dropped))
            except ScoringError as exc:
                raise _input_error(str(exc)) from None
        asked = (params or {}).get("quality")
        if asked is not None and str(asked) != expected_quality(self.calibration):
            raise _input_error(
                f"params quality={asked!r} but this scorer expects the quality "
                f"{expected_quality(self.calibration)!r} in quality_a/quality_b"
            )
        try:
            return score_frame(self.calibration, model_input, fmr=check_params(params))
        except ScoringError as exc:  # a 400 answer over REST, with the message
            raise _input_error(str(exc)) from None


def scorer_signature(quality: str = "quality") -> ModelSignature:
    """Outputs and the parameters ``fmr`` and ``quality`` (whose default names the per-image
    quality ``quality_a``/``quality_b`` must be); no input schema, on purpose.

    With an input schema MLflow drops unknown columns silently and echoes the whole input in
    its enforcement errors; without one ``score_frame`` sees the columns as sent, refuses
    unknown ones and names row and column without echoing data (both forms are documented in
    ``score_frame``).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = None
    outputs = Schema(
        [ColSpec(DataType.double, name) for name in ("score", "cosine", "quality")]
        + [ColSpec(DataType.boolean, "match")]
    )
    params = ParamSchema(
        [
            ParamSpec("fmr", DataType.double, DEFAULT_FMR),
            ParamSpec("quality", DataType.string, quality),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """A small example in the score form (embeddings are too long to show usefully)."""
    return pd.DataFrame(
        {"cosine": [0.62, 0.08], "quality_a": [24.5, 31.0], "quality_b": [27.25, 19.75]}
    )


def log_scorer(
    calibration: QMagFaceCalibration,
    *,
    name: str = "scorer",
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log ``calibration`` as a pyfunc model in the active run (optionally registering it).

    Stored: the sanitised calibration JSON, ``pyfunc_entry.py``, the signature, an input
    example and requirements (``qmag-ray``, ``mlflow``); no pickled Python object.
    """
    from qmag_ray.tracking.sanitize import sanitize

    clean = QMagFaceCalibration.from_dict(sanitize(calibration.to_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.json"
        path.write_text(clean.to_json())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY_FILE),
            artifacts={CALIBRATION_ARTIFACT: str(path)},
            signature=scorer_signature(expected_quality(calibration)),
            input_example=input_example(),
            pip_requirements=[f"qmag-ray=={__version__}", f"mlflow=={mlflow.__version__}"],
            registered_model_name=registered_model_name,
        )
