"""The gate as a JUnit XML report, the test-result format CI systems render (GitHub Actions through a
reporter action, GitLab, Jenkins, Azure Pipelines).

Layout: ``testsuites > testsuite "mediround eval gate" > testcase``. One case per score (classname
``mediround.gate.scores``, name ``<scope> <metric>``, e.g. ``round 2 cIoU``): failed with a message naming
the baseline value, the current value, the drop (and its interval) and the rule; skipped when the score
is reported but not gated (a small group, or no baseline). One case per coverage condition (classname
``mediround.gate.coverage``). The suite's properties carry the run manifest (data and model SHA-256, the
version that predicted) and the gate's settings. A run refused before scoring (bad input, data whose
SHA-256 differs from the predictions') is one failed case ``input`` saying why (``write_refusal_junit``).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from mediround import __version__
from mediround.atomic import atomic_path
from mediround.metrics import METRIC_LABELS
from mediround.reports.gate import GateReport, check_message

SUITE_NAME = "mediround eval gate"
SCORE_CLASS = "mediround.gate.scores"
COVERAGE_CLASS = "mediround.gate.coverage"
INPUT_CLASS = "mediround.gate"
VERSION_PROPERTY = "gate.mediround_version"
"""The version that gated (the manifest's ``mediround_version`` is the one that predicted)."""


def gate_properties(report: GateReport, manifest: Mapping[str, Any] | None) -> dict[str, str]:
    """The suite's properties: every field of the run ``manifest`` (numbers, lists and mappings as JSON),
    then the gate's baseline and settings under ``gate.``."""
    properties = {name: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                  for name, value in sorted((manifest or {}).items()) if value is not None}
    settings = report.settings
    properties.update({
        VERSION_PROPERTY: __version__,
        "gate.baseline": report.baseline or "none (a first baseline)",
        "gate.max_drop": f"{settings.max_drop:g}",
        "gate.rule": "plain threshold" if settings.confidence is None else "paired bootstrap over dialogues",
        "gate.scopes": ",".join(settings.scopes),
        "gate.min_group_size": str(settings.min_group_size),
    })
    if settings.confidence is not None:
        properties.update({"gate.confidence": f"{settings.confidence:g}", "gate.resamples": str(settings.resamples),
                           "gate.seed": str(settings.seed)})
    return properties


def _suite(root: ET.Element, properties: Mapping[str, str]) -> ET.Element:
    suite = ET.SubElement(root, "testsuite", name=SUITE_NAME)
    holder = ET.SubElement(suite, "properties")
    for name, value in properties.items():
        ET.SubElement(holder, "property", name=name, value=value)
    return suite


def _count(root: ET.Element, suite: ET.Element) -> None:
    """Fill the ``tests``/``failures``/``errors``/``skipped`` counts of the suite and of the root."""
    cases = suite.findall("testcase")
    counts = {"tests": len(cases), "failures": sum(1 for case in cases if case.find("failure") is not None),
              "errors": 0, "skipped": sum(1 for case in cases if case.find("skipped") is not None)}
    for element in (suite, root):
        for name, value in counts.items():
            element.set(name, str(value))


def _write(path: str | os.PathLike, root: ET.Element) -> None:
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def gate_junit(report: GateReport, manifest: Mapping[str, Any] | None = None) -> ET.Element:
    """The ``testsuites`` element of ``report``."""
    root = ET.Element("testsuites", name="mediround eval")
    suite = _suite(root, gate_properties(report, manifest))
    for check in report.scores:
        case = ET.SubElement(suite, "testcase", classname=SCORE_CLASS,
                             name=f"{check.scope} {METRIC_LABELS[check.metric]}")
        message = check_message(check, report.settings)
        if check.failed:
            ET.SubElement(case, "failure", message=message, type="regression").text = message
        elif check.not_gated is not None:
            ET.SubElement(case, "skipped", message=message)
        else:
            ET.SubElement(case, "system-out").text = message
    for condition in report.coverage:
        case = ET.SubElement(suite, "testcase", classname=COVERAGE_CLASS, name=condition.name)
        if condition.failure is not None:
            ET.SubElement(case, "failure", message=condition.failure, type="coverage").text = condition.failure
    _count(root, suite)
    return root


def write_junit(path: str | os.PathLike, report: GateReport, manifest: Mapping[str, Any] | None = None) -> None:
    """Write ``report`` as JUnit XML to ``path`` (atomically), whether the gate passed or failed."""
    _write(path, gate_junit(report, manifest))


def write_refusal_junit(path: str | os.PathLike, reason: str) -> None:
    """A JUnit XML file with one failed case ``input``: the run was refused before any score (``reason``)."""
    root = ET.Element("testsuites", name="mediround eval")
    suite = _suite(root, {VERSION_PROPERTY: __version__})
    case = ET.SubElement(suite, "testcase", classname=INPUT_CLASS, name="input")
    ET.SubElement(case, "failure", message=reason, type="refused").text = reason
    _count(root, suite)
    _write(path, root)
