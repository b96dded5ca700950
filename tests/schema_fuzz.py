"""Schemathesis over a live server's OpenAPI document: generated requests for every operation, answers judged.

``fuzz(schema, base_url, ...)`` takes any OpenAPI document and the URL of a running server (the JSON
API's ``create_app(...).openapi()``, the web UI's routes, ...) and sends ``max_examples`` generated
requests per operation and generation mode (valid data, then invalid data), without shrinking:
every answer is recorded instead of stopping at the first failure. What it judges:

* no answer is a 5xx (a request the server cannot handle must be refused, not crash it);
* every 4xx / 5xx answer to a non-HEAD request has OpenAI's error envelope (``api.errors``),
  unless the operation is listed in ``plain_errors``.

Hypothesis runs derandomized (the same examples every run, so its duration is stable) and without
its example database (nothing is written into the repository).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

DEFAULT_MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@dataclass
class FuzzReport:
    """Every answer's status per operation, and the answers that broke a rule (with a curl to replay them)."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    bad_envelopes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def summary(self) -> str:
        lines = [f"{self.calls} requests"]
        for label, counts in sorted(self.statuses.items()):
            lines.append(f"  {label}: " + ", ".join(f"{s} x{n}" for s, n in sorted(counts.items())))
        return "\n".join(lines)


def is_envelope(content: bytes) -> bool:
    """``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and {"param", "code"} <= set(error)
    )


def fuzz(
    schema: dict[str, Any],
    base_url: str,
    *,
    max_examples: int,
    headers: dict[str, str] | None = None,
    include: Callable[[str, str], bool] = lambda method, path: True,
    modes: Iterable[GenerationMode] = DEFAULT_MODES,
    plain_errors: frozenset[str] = frozenset(),
    timeout_s: float = 120.0,
) -> FuzzReport:
    """Send generated requests for every operation ``include(method, path)`` admits; see the module doc."""
    report = FuzzReport()
    loaded = schemathesis.openapi.from_dict(schema)
    for result in loaded.get_all_operations():
        operation = result.ok()
        method, path = operation.method.upper(), operation.path
        if not include(method, path):
            continue
        label = f"{method} {path}"
        counts = report.statuses.setdefault(label, Counter())
        for mode in modes:

            def send(case: schemathesis.Case, label: str = label, counts: Counter[int] = counts) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
                status = response.status_code
                counts[status] += 1
                if status >= 500:
                    report.server_errors.append(_describe(label, case, response, headers))
                elif (
                    status >= 400
                    and case.method.upper() != "HEAD"
                    and label not in plain_errors
                    and not is_envelope(response.content)
                ):
                    report.bad_envelopes.append(_describe(label, case, response, headers))

            _each_case(operation.as_strategy(generation_mode=mode), send, max_examples)
    return report


def _each_case(strategy: Any, send: Callable[[schemathesis.Case], None], max_examples: int) -> None:
    """Hypothesis draws up to ``max_examples`` cases from ``strategy`` and hands each to ``send``."""

    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        send(case)

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # an operation without inputs has no invalid data
        run()


def _describe(label: str, case: schemathesis.Case, response: schemathesis.Response, headers: Any) -> str:
    try:
        curl = case.as_curl_command(headers=headers)
    except Exception as exc:  # a case whose curl cannot be written is still reported
        curl = f"(no curl: {exc})"
    return f"{label} -> {response.status_code}: {response.content[:300]!r}\n    {curl}"
