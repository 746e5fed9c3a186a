"""Shared test setup: where the sample clips are, and which tests run by default.

Slow tests run with `--runslow` or DUALFORCE_SLOW=1; GPU tests run only where CUDA is present.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("DUALFORCE_SAMPLES", REPO.parent / "shared" / "samples"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    """Configure Prefect's logging now, while sys.stderr is pytest's session-long stream. Importing `prefect.main`
    binds Prefect's console handler to the sys.stderr of that moment; left to the first test that imports a flow, a
    test with `capsys` bound it to a stream closed after that test, and every later flow's logging raised "I/O
    operation on closed file" (tests/test_backfill.py before tests/test_step_store_remote.py failed that way)."""
    import prefect.main  # noqa: F401


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("DUALFORCE_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_slow = pytest.mark.skip(reason="slow: use --runslow or DUALFORCE_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not (SAMPLES / "sun.mp4").exists():
        pytest.fail(f"sample clips not found under {SAMPLES} (set DUALFORCE_SAMPLES)")
    return SAMPLES


@pytest.fixture(scope="session")
def prefect_test_server() -> str:
    """One Prefect test server (fresh SQLite database + server process, ~17 s to start on the 2-core machine)
    for every module that runs flows in-process; its settings stay active until the session ends. Tests that
    read the API back filter by their own artifact keys and flow runs. Yields the API URL."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield prefect.settings.PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def yongen_crop(samples_dir, tmp_path_factory):
    """The real yongen.mp4 through the crop step once per session (about 8 s)."""
    from tasks.steps.crop import crop_clip

    out = tmp_path_factory.mktemp("crop") / "yongen"
    return crop_clip(samples_dir / "yongen.mp4", out)


def make_video(path: Path, *, seconds: float, size: str = "320x240", source: str = "testsrc2", audio: bool = True) -> Path:
    """A small synthetic clip via ffmpeg lavfi (for no-face cases only; faces come from the real samples)."""
    from tasks.media import run_ffmpeg

    args = ["-y", "-f", "lavfi", "-i", f"{source}=size={size}:rate=25:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    args += ["-c:v", "libx264", "-pix_fmt", "yuv420p"] + (["-c:a", "aac", "-shortest"] if audio else []) + [str(path)]
    run_ffmpeg(args, "making a test clip")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def single_process_env(monkeypatch, tmp_path):
    """world size 1 inside the test process (what a launcher would set)."""
    from training.launch import environment

    for key, value in environment().items():
        if key in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for launched trainers
    yield
    torch.set_num_threads(threads)
