"""protege's own exception: a problem the user can fix, phrased as the fix. The CLI prints it as one line
and exits 2; library users catch it (``protege.TaskError``)."""


class TaskError(ValueError):
    """A problem with the task file or its data, phrased for the person who has to fix it."""
