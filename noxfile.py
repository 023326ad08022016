"""Sessions: tests, lint, bench (default sweep + report), smoke (every cell, tiny), report, perf, cluster;
each forwards its arguments."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
CONSTRAINTS = ("-c", "constraints.txt")
# pip byte-compiles every installed module (torch's thousands) unless told not to; Python compiles
# what is imported anyway. Saves about 20 s of each fresh environment on 2 cores.
PIP_OPTIONS = ("--no-compile",)


def install(session: nox.Session, *extras: str) -> None:
    target = f".[{','.join(extras)}]" if extras else "."
    session.install(*PIP_OPTIONS, "-e", target, *CONSTRAINTS)


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


def _install_once(session: nox.Session, *requirements: str) -> None:
    """Install into a reused session environment only when the packaging files changed (the
    package is installed editable, so source changes need no reinstall)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in ("pyproject.toml", "constraints.txt")))
    digest.update(repr(requirements).encode())
    marker = Path(session.virtualenv.location, ".bmb-installed")
    if marker.exists() and marker.read_text() == digest.hexdigest():
        return
    if requirements:  # a light environment: these, and the package without its dependencies
        session.install(*PIP_OPTIONS, *requirements)
        session.install(*PIP_OPTIONS, "--no-deps", "-e", ".")
    else:
        install(session)
    marker.write_text(digest.hexdigest())


# What `python -m benchmark.report` needs: no torch.
REPORT_REQUIREMENTS = ("numpy>=1.24", "pandas>=2.0", "scipy>=1.10", "matplotlib>=3.7", "seaborn>=0.13", "pyarrow>=14")


def _store(args: list[str], default: str = "results") -> str:
    """The --store given among a session's arguments (so that the report reads the same store)."""
    for i, arg in enumerate(args):
        if arg == "--store" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--store="):
            return arg.split("=", 1)[1]
    return default


BENCH_SWEEPS = ("default", "udi-ablation")


@nox.session
def bench(session: nox.Session) -> None:
    """The default sweep and UDI's ablations (`udi-ablation`: its two-modality cells are the default
    sweep's own runs, plus a three-modality set) into results/ (resumes; only missing runs are
    trained), as one grid over one pool of workers, then the report. Arguments go to
    `python -m benchmark sweep` (e.g. -- --jobs 2 --store /tmp/store)."""
    _install_once(session)
    args = list(session.posargs)
    # Exit status 1 means some runs failed (recorded with their reason): report the rest anyway.
    session.run("python", "-m", "benchmark", "sweep", *BENCH_SWEEPS, *args, success_codes=[0, 1])
    session.run("python", "-m", "benchmark", "report", "--store", _store(args))


@nox.session
def smoke(session: nox.Session) -> None:
    """Every cell of a sweep (default: `default`) on tiny subsets, one epoch, into a temporary store.
    Arguments go to `python -m benchmark sweep`; a first argument that is not an option names the sweep."""
    _install_once(session)
    args = list(session.posargs)
    name = args.pop(0) if args and not args[0].startswith("-") else "default"
    session.run("python", "-m", "benchmark", "sweep", name, "--smoke", "--no-live", *args)


@nox.session
def report(session: nox.Session) -> None:
    """Tables and figures in reports/ and the README results table, from the records in results/
    (reads the store only: a light environment without torch; another --store writes beside that store
    and leaves README.md alone). Arguments go to `python -m benchmark.report`."""
    _install_once(session, *REPORT_REQUIREMENTS)
    session.run("python", "-m", "benchmark.report", *session.posargs)


@nox.session
def perf(session: nox.Session) -> None:
    """Throughput, step time and peak memory of every method as ratios to a minimal loop; the table
    goes to reports/perf.md. Arguments go to `python -m benchmark perf`."""
    _install_once(session)
    session.run("python", "-m", "benchmark", "perf", *session.posargs)


@nox.session
def cluster(session: nox.Session) -> None:
    """A single-node SLURM cluster and a PostgreSQL server in a temporary folder (Debian's slurm-wlm,
    munge and postgresql are installed when absent): a smoke sweep through the SLURM launcher and a
    two-worker tuning study in PostgreSQL, checked, then everything torn down. Arguments go to
    tools/cluster.py (e.g. -- --keep)."""
    install(session, "cluster")
    session.run("python", "tools/cluster.py", *session.posargs)
