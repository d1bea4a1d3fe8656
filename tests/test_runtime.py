"""How entry points connect to Ray (qmag_ray.runtime.connect_ray).

``ray.init`` is replaced by a recorder here: the point is which cluster is asked for, and
starting or attaching to a real one would hide the difference (this session's Ray, and other
clusters on the machine, are there whatever the call asks for).
"""

from __future__ import annotations

from typing import Any

import pytest


class _Stop(Exception):
    pass


def _init_kwargs(monkeypatch: pytest.MonkeyPatch, address: str | None) -> dict[str, Any]:
    import ray

    from qmag_ray.runtime import connect_ray

    seen: dict[str, Any] = {}

    def record(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record)
    with pytest.raises(_Stop):
        connect_ray(address)
    return seen


def test_no_address_starts_a_local_cluster_never_another_one_on_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a bare ray.init() attaches to the cluster `ray start` last started on this machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = _init_kwargs(monkeypatch, None)
    assert seen["address"] == "local" and seen["include_dashboard"] is False


def test_ray_address_of_a_submitted_job_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    seen = _init_kwargs(monkeypatch, None)
    assert "address" not in seen  # ray.init() reads RAY_ADDRESS itself


def test_an_explicit_address_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    seen = _init_kwargs(monkeypatch, "10.0.0.2:6379")
    assert seen["address"] == "10.0.0.2:6379"


RAY_TIMEOUT = (  # Ray 2.60's words (ray/_private/node.py) when its 30 s window passes
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


def _failing_init(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import ray

    def fail(**kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)


def test_a_local_ray_that_misses_its_start_up_window_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qmag_ray.runtime import RayStartError, connect_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _failing_init(monkeypatch, Exception(RAY_TIMEOUT))
    with pytest.raises(RayStartError) as err:
        connect_ray(None)
    text = str(err.value)
    assert "did not start within Ray's fixed 30 s start-up window" in text
    assert "run the same command again" in text and "--ray-address" in text
    assert "load average" in text and "\n" not in text


@pytest.mark.parametrize(
    ("address", "message"), [("10.0.0.2:6379", RAY_TIMEOUT), (None, "something else")]
)
def test_other_ray_start_failures_pass_unchanged(
    monkeypatch: pytest.MonkeyPatch, address: str | None, message: str
) -> None:
    from qmag_ray.runtime import connect_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    error = Exception(message)
    _failing_init(monkeypatch, error)
    with pytest.raises(Exception) as err:  # noqa: PT011 - exactly the error Ray raised
        connect_ray(address)
    assert err.value is error


def test_connecting_imports_neither_ray_data_nor_torch() -> None:
    """A calibration driver needs neither: importing ray.data pulls in torch and pandas (~270
    MB PSS measured on the calibration benchmark's driver). Run in a fresh interpreter, since
    this test session has imported both already."""
    import subprocess
    import sys

    code = (
        "import sys, types, ray\n"
        "ray.is_initialized = lambda: False\n"
        "ray.init = lambda **kwargs: None\n"
        "ray.get_runtime_context = lambda: types.SimpleNamespace(gcs_address='127.0.0.1:1')\n"
        "from qmag_ray.runtime import connect_ray\n"
        "print(connect_ray(None))\n"
        "print(sorted(m for m in ('ray.data', 'torch', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.splitlines()[-2:] == ["127.0.0.1:1", "[]"]
