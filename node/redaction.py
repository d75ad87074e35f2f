"""Keep patient values out of the log that libraries would write there.

pydicom validates a value when it first decodes it and, finding it invalid,
both logs and warns ``Invalid value for VR DA: '1961-03-14'.``: the value itself,
which for a malformed Patient's Birth Date, an over-long Patient's Name or an
Age String such as ``40000D`` is patient data.  The node decodes every patient
attribute (the de-identification walks them all, highdicom copies the patient
module into the results), so a study sent with one malformed attribute would
put it into the log.  :func:`redact_library_values` (the CLI calls it when it
sets up logging) keeps the fact and drops the value: the ``pydicom`` logger's
record says ``Invalid value for VR DA (value not logged)``, and the duplicate
Python warning of the same text is ignored.

The project's own messages name attributes and UIDs only (see the shared
design's logging rule); highdicom's person-name warning is avoided at its source
(:mod:`node.stages.reports.source`).
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["ValueRedactor", "redact_library_values"]

_INVALID_VALUE = re.compile(r"^Invalid value for VR (?P<vr>[A-Z]{2}): ")


class ValueRedactor(logging.Filter):
    """Rewrites pydicom's ``Invalid value for VR XX: '...'`` records without the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = _INVALID_VALUE.match(message)
        if match is not None:
            record.msg = f"Invalid value for VR {match.group('vr')} (value not logged)"
            record.args = ()
        return True


_REDACTOR = ValueRedactor()


def redact_library_values() -> None:
    """Install the redaction on the ``pydicom`` logger and ignore the warnings it duplicates.

    Safe to call more than once; a process-wide setting, so only the composition
    root (the CLI) calls it.
    """
    logging.getLogger("pydicom").addFilter(_REDACTOR)  # the same instance is added once
    warnings.filterwarnings("ignore", message=r"Invalid value for VR [A-Z]{2}: ", category=UserWarning,
                            module=r"pydicom(\.|$)")
