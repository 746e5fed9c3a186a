"""The README's "From the dry-run to a real run" section: every command parses with the CLI's own parsers, and the
paths it writes are the paths the next command and configs/program-lite.yaml read."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## From the dry-run to a real run")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def _commands() -> list[list[str]]:
    """Every line of the section's bash blocks, continuations joined, comments dropped, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _section(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _ours(name: str) -> list[list[str]]:
    return [argv[1:] for argv in _commands() if argv[0] == "./run" and argv[1] == name]


def _parse(argv: list[str]):
    from flows.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of saying a flag or choice does not exist
        pytest.fail(f"./run {shlex.join(argv)}: does not parse ({exc})")


def _resolve(p: str) -> Path:
    return (REPO / p).resolve()


def test_every_command_is_ours_or_a_download_and_parses():
    commands = _commands()
    assert len(commands) >= 15
    for argv in commands:
        assert argv[0] in ("./run", "huggingface-cli"), argv
        if argv[0] == "./run":
            _parse(argv[1:])
        else:
            assert argv[1] == "download" and "--local-dir" in argv
    assert {argv[1] for argv in commands if argv[0] == "./run"} >= {
        "manifest", "preprocess", "program", "export", "generate", "evaluate", "plan"}


def test_manifests_feed_preprocess_and_every_dataset_is_known():
    from datasets_manifest.build import DATASETS

    written = {}
    for argv in _ours("manifest"):
        args = _parse(argv)
        assert args.dataset in DATASETS
        written[_resolve(args.out)] = args.dataset
    for argv in _ours("preprocess"):
        args = _parse(argv)
        assert _resolve(args.manifest) in written, argv  # a manifest the section wrote


def test_preprocess_writes_the_shard_sets_the_program_file_names():
    from training.program import load_program

    program = load_program(REPO / "configs" / "program-lite.yaml")
    made = {}
    for argv in _ours("preprocess"):
        args = _parse(argv)
        made[_resolve(args.out) / args.dataset / "shards"] = args.profile
    for stage, profile in (("concept", "talking_head"), ("pretrain", "general"), ("joint", "talking_head")):
        for shards in getattr(program, stage).shards:
            assert made.get(Path(shards).resolve()) == profile, (stage, shards, made)
    # the Wan transformer pretrain warm-starts from is where the download puts it
    downloads = [argv for argv in _commands() if argv[0] == "huggingface-cli"]
    wan = next(a for a in downloads if a[2] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert Path(program.pretrain.init_from.wan).resolve() == _resolve(wan[wan.index("--local-dir") + 1]) / "transformer"
    assert "transformer/*" in wan and "vae/*" in wan


def test_weights_flags_name_the_downloaded_folders():
    downloads = {a[2]: _resolve(a[a.index("--local-dir") + 1]) for a in _commands() if a[0] == "huggingface-cli"}
    for argv in _ours("preprocess"):
        args = _parse(argv)
        assert (_resolve(args.wan_vae), args.wan_vae_subfolder) == (downloads["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], "vae")
        if args.profile == "talking_head":
            # LivePortrait's repository is its pretrained_weights/ tree; --liveportrait-root is the folder above it
            assert _resolve(args.liveportrait_root) / "pretrained_weights" == downloads["KwaiVGI/LivePortrait"]
            assert _resolve(args.hubert) == downloads["facebook/hubert-large-ls960-ft"]


def test_export_takes_the_joint_run_and_generate_and_evaluate_take_the_export():
    from flows.train import attempt_dir
    from training.program import load_program
    from training.train_config import TrainConfig

    program = load_program(REPO / "configs" / "program-lite.yaml")
    assert [_resolve(a[1]) for a in _ours("program")] == [REPO / "configs" / "program-lite.yaml"]
    window = 4 * 8 + 1  # preprocess's default --window-frames
    joint = TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": window, **program.joint.train})
    expected_run = attempt_dir(Path(program.out_dir) / "joint" / "from-pretrain", joint)
    (export,) = _ours("export")
    args = _parse(export)
    assert _resolve(args.run_dir) == expected_run.resolve()
    model = _resolve(args.out)
    for name in ("generate", "evaluate"):
        (argv,) = _ours(name)
        assert _resolve(_parse(argv).model) == model
    (evaluate,) = _ours("evaluate")
    args = _parse(evaluate)
    assert all(getattr(args, flag) for flag in ("liveportrait_root", "syncnet", "i3d", "fid_inception"))
    table = _section()
    for weights in (args.syncnet, args.i3d, args.fid_inception):
        assert f"`{weights}`" in table  # the file is the one the weights table says where to put
