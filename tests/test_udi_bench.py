"""The controller-cost benchmark script runs and times both modes (the ratio itself is a
measurement, quoted from a full run, not asserted here)."""

from __future__ import annotations

from udi.bench_controller import main, measure


def test_bench_times_static_and_dynamic_epochs() -> None:
    tiny = {"dataset.n_train": 128, "dataset.n_val": 32, "dataset.n_test": 32, "batch_size": 32}
    res = measure(tiny, repeats=2, warmup=1)
    assert len(res["times"]["static"]) == len(res["times"]["dynamic"]) == 2
    assert res["steps_per_epoch"] == 4 and res["follower"] != res["anchor"]
    assert res["controller_median_s"] > 0  # the dynamic epochs did compute the controller
    assert res["static_median_s"] > 0 and res["median_paired_ratio"] > 0


def test_bench_refuses_bad_options(capsys) -> None:
    assert main(["--set", "method.club_mode=nope", "--repeats", "1"]) == 2
    assert "club_mode" in capsys.readouterr().err
