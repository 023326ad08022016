"""The suite's faster paths compute what the plain ones do, to the bit: SmallCNN's max-pooling
before its ReLU, the global average pool's backward, the probes' single BLAS thread and the
thread pools a sweep worker sizes."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits
from torch import nn
from torch.nn import functional as F

from benchmark.data.base import ModalitySpec
from benchmark.device import process_threads
from benchmark.metrics import linear_probe_predictions
from benchmark.models.encoders import CGMNISTConvNet, GlobalAvgPool, SmallCNN


def _relu_first(encoder: nn.Module) -> nn.Sequential:
    """The same layers, and the same weights, in the textbook order conv → BN → ReLU → pool, with
    the library's own global average pool."""
    layers = list(copy.deepcopy(encoder.net))
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    layers = [nn.AdaptiveAvgPool2d(1) if isinstance(m, GlobalAvgPool) else m for m in layers]
    return nn.Sequential(*layers)


def _step(net: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
    out = net(x)
    loss = F.cross_entropy(head(out), y)
    params = [*net.parameters(), *head.parameters()]
    grads = torch.autograd.grad(loss, params)
    return out.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("shape", [(1, 40, 101), (3, 28, 28), (1, 8, 8), (2, 7, 9)])
def test_small_cnn_pools_before_its_relu_with_the_same_outputs_and_gradients(shape) -> None:
    torch.manual_seed(0)
    encoder = SmallCNN(ModalitySpec("m", "image", shape, "small_cnn"))
    kinds = [type(m).__name__ for m in encoder.net]
    assert kinds.count("MaxPool2d") == 2 and kinds.index("MaxPool2d") < kinds.index("ReLU")
    reference = _relu_first(encoder)
    head = nn.Linear(encoder.out_dim, 5)
    x = torch.randn(16, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (16,))
    for train in (True, False):  # batch statistics, then running statistics
        encoder.train(train)
        reference.train(train)
        got, got_grads = _step(encoder.net, head, x, y)
        want, want_grads = _step(reference, head, x, y)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
        # the running statistics moved identically too
        assert all(torch.equal(a, b) for a, b in zip(encoder.net.buffers(), reference.buffers()))


@pytest.mark.parametrize("shape", [(64, 128, 5, 13), (8, 128, 4, 4), (3, 7, 1, 1), (5, 32, 10, 26), (2, 3, 7, 9)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_global_average_pool_matches_the_library_to_the_bit(shape, layout) -> None:
    torch.manual_seed(1)
    x = (3 * torch.randn(shape)).contiguous(memory_format=layout)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = GlobalAvgPool()(torch.relu(a)), F.adaptive_avg_pool2d(torch.relu(b), 1)
    assert got.shape == want.shape == (shape[0], shape[1], 1, 1)
    assert torch.equal(got, want)
    g = 5 * torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_global_average_pool_falls_back_to_the_library_off_the_fast_path() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = GlobalAvgPool()(x)
    assert out.grad_fn is not None and "MeanOverPixels" not in type(out.grad_fn).__name__
    fast = GlobalAvgPool()(torch.randn(2, 3, 4, 5, requires_grad=True))
    assert "MeanOverPixels" in type(fast.grad_fn).__name__
    assert isinstance(CGMNISTConvNet(ModalitySpec("m", "image", (1, 28, 28), "small_cnn")).net[-2], GlobalAvgPool)


def test_the_probe_gives_the_same_predictions_whatever_the_blas_threads() -> None:
    # features of av-digits' size (1259 × 128): fitted on two OpenBLAS threads instead of one, the
    # same L-BFGS ends at another optimum here and two of the 359 test predictions change
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1259)
    train = torch.from_numpy((rng.standard_normal((1259, 128)) + 0.3 * y[:, None]).astype(np.float32))
    test = torch.from_numpy((rng.standard_normal((359, 128)) + 0.3 * rng.integers(0, 10, 359)[:, None]).astype(np.float32))
    with threadpool_limits(limits=1):
        one = linear_probe_predictions(train, torch.from_numpy(y), test)
    with threadpool_limits(limits=2):
        two = linear_probe_predictions(train, torch.from_numpy(y), test)
    assert np.array_equal(one, two)
    assert 0.3 < np.mean(linear_probe_predictions(train, torch.from_numpy(y), train) == y) <= 1.0


def test_process_threads_sizes_every_pool_and_gives_them_back() -> None:
    before_torch = torch.get_num_threads()
    before = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpool_info()}
    with process_threads(1):
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == before_torch
    assert {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpool_info()} == before
    with process_threads(None):  # no thread count: nothing changes
        assert torch.get_num_threads() == before_torch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_process_reuses_freed_memory_without_page_faults() -> None:
    """After ``keep_freed_memory`` a process that allocates, writes and frees 40 MiB of blocks
    again and again (as a training step does) takes its pages from what it freed. With glibc's
    defaults the freed top of the heap goes back to the system and every page faults again
    (163,200 faults for this loop on the machine that wrote the test)."""
    script = textwrap.dedent("""
        import resource, torch
        from benchmark.procs import keep_freed_memory
        applied = keep_freed_memory()
        def step():
            a, b, c = torch.ones(4 << 20), torch.ones(4 << 20), torch.ones(2 << 20)  # 16 + 16 + 8 MiB, written
            del a, b, c
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            step()
        print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    applied, faults = out.stdout.split()
    assert applied == "True"
    pages = 20 * (40 << 20) // 4096
    # without the setting every page faults again (≈ 0.8 of the pages written); with it, a run has
    # measured 0 to 0.1 (the kernel may still take back a few MiB between steps)
    assert int(faults) < pages // 4, f"{faults} page faults for {pages} pages written"


# --- fused optimiser steps on the CPU -------------------------------------------------------------------
def _alternating_run(make_opt, steps: int = 40) -> torch.Tensor:
    """Two encoders and a shared head; from step 5 on, odd steps train the second encoder alone (its
    first step comes after the head's buffers exist), as MLA's per-modality steps do."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    b = nn.Linear(16, 8)
    head = nn.Linear(8, 4)
    params = [*a.parameters(), *b.parameters(), *head.parameters()]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(32, 16, generator=g)
        encoder = b if i >= 5 and i % 2 else a
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(encoder(x)), torch.arange(32) % 4).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_fused_cpu_step_follows_the_librarys_default_step(name) -> None:
    from benchmark.config import build_config
    from benchmark.method import make_optimizer

    cfg = build_config({"method": "joint", "dataset": "synthetic", "optimizer": name, "lr": 0.05,
                        "momentum": 0.9, "weight_decay": 1e-3})
    plain = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
             "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-3),
             "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=1e-3)}[name]
    assert make_optimizer([nn.Parameter(torch.zeros(2))], cfg).defaults["fused"] is True
    fused, reference = _alternating_run(lambda p: make_optimizer(p, cfg)), _alternating_run(plain)
    # the same update rounded differently: far below the size of one step (lr 0.05)
    assert torch.allclose(fused, reference, rtol=0, atol=1e-5), (fused - reference).abs().max()
    assert not torch.equal(fused, _alternating_run(lambda p: make_optimizer(p, build_config(
        {"method": "joint", "dataset": "synthetic", "optimizer": name, "lr": 0.04, "momentum": 0.9,
         "weight_decay": 1e-3}))))  # the comparison sees a change of learning rate


def test_zero_momentum_buffers_start_where_the_library_starts() -> None:
    """Without dampening, a zero buffer's first update is the gradient itself: the fused step with
    zero buffers matches the default step that creates its buffers from the first gradient."""
    from benchmark.method import zero_momentum

    def fused_zeroed(p):
        opt = torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True)
        zero_momentum(opt)
        return opt

    with pytest.raises(TypeError):  # the library's fused step alone refuses the MLA-like schedule
        _alternating_run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True))
    got = _alternating_run(fused_zeroed)
    assert torch.allclose(got, _alternating_run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
                          rtol=0, atol=1e-5)
    one = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([one], lr=0.5, momentum=0.9, fused=True)
    zero_momentum(opt)
    one.grad = torch.tensor([0.25, -0.75])
    opt.step()
    assert torch.equal(opt.state[one]["momentum_buffer"], torch.tensor([0.25, -0.75]))
    assert torch.equal(one.detach(), torch.tensor([1.0 - 0.125, -2.0 + 0.375]))


def test_figures_drawn_by_worker_processes_are_the_files_drawn_inline(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from benchmark.report_plot import figure_workers, save_figure

    def draw(folder) -> None:
        sns.set_theme(style="whitegrid", context="paper")
        for k in range(3):
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.plot(np.arange(10), np.arange(10) ** (k + 1), label=f"power {k + 1}")
            ax.set(title=f"figure {k}", xlabel="x", ylabel="y")
            ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
            save_figure(fig, [(folder / f"f{k}.png", {"dpi": 90}), folder / f"f{k}.pdf"], tight=k != 1,
                        bbox_inches="tight")

    import os
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    (tmp_path / "inline").mkdir()
    (tmp_path / "workers").mkdir()
    draw(tmp_path / "inline")
    with figure_workers(2):
        draw(tmp_path / "workers")
    sns.reset_orig()
    names = sorted(p.name for p in (tmp_path / "inline").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "workers").iterdir()) and len(names) == 6
    for name in names:
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "workers" / name).read_bytes(), name


def test_a_figure_that_cannot_be_pickled_is_drawn_in_this_process(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from benchmark.report_plot import figure_workers, save_figure

    with figure_workers(2):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.1f}"))
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pickle.dumps(fig)
        save_figure(fig, [tmp_path / "f.png"])
    assert (tmp_path / "f.png").stat().st_size > 0


def test_a_figure_that_cannot_be_written_fails_the_block(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmark.report_plot import figure_workers, save_figure

    with pytest.raises(FileNotFoundError), figure_workers(2):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        save_figure(fig, [tmp_path / "missing" / "f.png"])
