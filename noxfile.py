"""Sessions: tests, lint, bench (end-to-end run), smoke; each forwards its arguments."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, *extras: str) -> None:
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", target, *CONSTRAINTS)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU only)."""
    install(session, "test")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole project."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """A quick end-to-end benchmark: every method on the synthetic imbalanced preset."""
    install(session)
    session.run("python", "-m", "benchmark", "bench", *session.posargs)
