"""Exceptions that the command line turns into one-line messages."""


class UsageError(Exception):
    """Bad input from the user: an unknown name, a bad value, a missing path. Exit status 2."""


class FilterMatchesNothing(UsageError):
    """A sweep filter (--dataset, --method, --seed, --label, --where) that selects none of a sweep's runs."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the run is recorded as failed."""
