"""The one error type of the report tool: input it cannot use.

Every problem with what the user handed in (a path that is not a run, a run
without the tags a criterion needs, a criteria file that does not parse) is a
``ReportInputError`` whose message names the thing and its value, so the CLI
can print it as one paragraph and exit with status 2. This module must never
hold logic of its own.
"""


class ReportInputError(ValueError):
    """Input the report tool cannot use; the message names the field or path and why."""
