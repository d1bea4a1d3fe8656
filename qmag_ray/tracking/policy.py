"""The registration policy, one for ``calibrate`` and ``recalibrate``.

What is registered: the fitted scorer (``register_scorer``: calibration.json + the pyfunc
code file), as a new version of the registered model.

When: only when registration is enabled and the calibration's held-out guard did NOT fail
(passed, or not decided because there is no held-out side). A scorer worse than plain cosine
on held-out identities is never registered: its run and files are still recorded.

With which tags: the calibration's figures (``registry.calibration_tags``), the guard verdict
(``qmag_ray.guard``: passed, failed or not_evaluated), the run id, the kind of run, and what the
caller adds (recalibrate: the inputs' fingerprint).

Which alias moves: ``calibrate`` moves the alias it is given (``--alias``) when the guard
passed; without ``--alias`` the first version of a model whose guard passed becomes
``champion`` (so ``models:/<name>@champion`` works right after the first calibration), and
later versions leave the champion alone (the command says how to promote). ``recalibrate``
always points ``challenger`` at its new version and moves ``champion`` only through the gate
(``promotion.promote_if_better``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qmag_ray.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    register_scorer,
    set_alias,
)

if TYPE_CHECKING:
    from qmag_ray.calibration.result import QMagFaceCalibration

TAG_GUARD = "qmag_ray.guard"
TAG_RUN_ID = "qmag_ray.run_id"
TAG_KIND = "qmag_ray.kind"


def guard_verdict(passed: bool | None) -> str:
    """The guard verdict as a tag value."""
    return {True: "passed", False: "failed", None: "not_evaluated"}[passed]


@dataclass(frozen=True)
class Registration:
    """What the policy did with one fitted scorer.

    Attributes:
        registered: a version was registered.
        reason: one line for the console and the run's ``qmag_ray.registered`` tag.
        model_name, version: the registered version (``version`` None when not registered).
        aliases: aliases pointed at the version.
        hint: what the user can do next (e.g. how to promote), or "".
    """

    registered: bool
    reason: str
    model_name: str
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "reason": self.reason,
            "model_name": self.model_name,
            "version": self.version,
            "aliases": list(self.aliases),
            "hint": self.hint,
        }

    def lines(self) -> list[str]:
        """The console lines (``registry: ...``)."""
        out = [f"registry: {self.reason}"]
        if self.aliases:
            targets = ", ".join(f"models:/{self.model_name}@{a}" for a in self.aliases)
            out.append(f"registry: {targets} -> version {self.version}")
        if self.hint:
            out.append(f"registry: {self.hint}")
        return out


def may_register(guard_passed: bool | None, *, enabled: bool = True) -> tuple[bool, str]:
    """Whether a scorer with this guard verdict is registered, and why (one line)."""
    if not enabled:
        return False, "not registered (registration switched off: --no-register)"
    if guard_passed is False:
        return False, (
            "NOT registered as a champion candidate: on held-out pairs the fitted scorer is "
            "worse than plain cosine (guard failed; see the table above). The run and its "
            "calibration.json are recorded for inspection."
        )
    return True, ""


def promote_hint(model_name: str, version: str, alias: str = CHAMPION) -> str:
    """How to point ``alias`` at ``version`` by hand."""
    return (
        f"to make it {alias}: qmag-ray calibrate ... --alias {alias}, or in Python "
        f"mlflow.MlflowClient().set_registered_model_alias({model_name!r}, {alias!r}, "
        f"{version!r})"
    )


def register(
    calibration: QMagFaceCalibration,
    *,
    model_name: str,
    run_id: str,
    kind: str,
    guard_passed: bool | None,
    enabled: bool = True,
    tags: Mapping[str, Any] | None = None,
) -> Registration:
    """Register ``calibration`` if the policy allows (see the module docstring); no alias."""
    allowed, reason = may_register(guard_passed, enabled=enabled)
    if not allowed:
        return Registration(False, reason, model_name)
    version_tags = {
        TAG_GUARD: guard_verdict(guard_passed),
        TAG_RUN_ID: run_id,
        TAG_KIND: kind,
        **dict(tags or {}),
    }
    version = str(register_scorer(calibration, model_name=model_name, tags=version_tags).version)
    caveat = "" if guard_passed else " (not checked on held-out pairs: no alias is moved)"
    return Registration(True, f"{model_name} version {version}{caveat}", model_name, version)


def calibrate_aliases(
    registration: Registration, guard_passed: bool | None, alias: str | None
) -> Registration:
    """``calibrate``'s alias rule (module docstring) applied to a registered version."""
    if not registration.registered or registration.version is None:
        return registration
    name, version = registration.model_name, registration.version
    if guard_passed is not True:
        return _with(registration, hint=promote_hint(name, version, alias or CHAMPION))
    if alias:
        set_alias(name, alias, version)
        return _with(registration, aliases=[alias])
    if alias_version(name, CHAMPION) is None:
        set_alias(name, CHAMPION, version)
        return _with(registration, aliases=[CHAMPION], hint="first version: made champion")
    return _with(registration, hint=promote_hint(name, version))


def challenger(registration: Registration) -> Registration:
    """``recalibrate``'s first alias: the new version is the ``challenger``."""
    if registration.registered and registration.version is not None:
        set_alias(registration.model_name, CHALLENGER, registration.version)
        return _with(registration, aliases=[CHALLENGER])
    return registration


def _with(registration: Registration, **changes: Any) -> Registration:
    from dataclasses import replace

    merged = dict(changes)
    if "aliases" in merged:
        merged["aliases"] = [*registration.aliases, *merged["aliases"]]
    return replace(registration, **merged)
