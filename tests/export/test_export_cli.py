"""tte-export's command line: checkpoint resolution, bad arguments (one-line errors, non-zero exit), the
--force replacement, real-architecture specs for --random-init, and no half-written engine on failure."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cli_checks import assert_usage_error
from export_fixtures import cli  # noqa: F401  (pytest fixtures)
from tte_engine import Engine
from tte_engine.checkpoint import resolve_checkpoint
from tte_engine.errors import CheckpointError, ExportError
from tte_engine.export.pipeline import ExportOptions, run_export


def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tte-export: error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_missing_checkpoint_path(cli, tmp_path):
    proc = cli("--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "out")
    _one_line_error(proc, "nowhere does not exist", "pass a Hugging Face Qwen2-VL checkpoint directory")
    assert not (tmp_path / "out").exists()


def test_unknown_alias_and_real_alias_without_weights(cli, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hf")}
    where = str(Path(os.environ["TTE_HOME"]) / "models" / "no-such-model")
    _one_line_error(cli("--checkpoint", "no-such-model", "--out", tmp_path / "o1", env=env), "'no-such-model' not found", f"looked in {where}",
                    f"Place a Hugging Face Qwen2-VL checkpoint directory at {where}")
    proc = cli("--checkpoint", "unified-2b", "--out", tmp_path / "o2", env=env)
    _one_line_error(proc, "unified-2b", str(tmp_path / "hf"), "Qwen/Qwen2-VL-2B-Instruct", "--random-init")
    _one_line_error(cli("--checkpoint", "no-such-model", "--random-init", "--out", tmp_path / "o3"), "--random-init needs an architecture alias")


def test_bad_options_are_one_line(cli, tmp_path):
    _one_line_error(cli("--checkpoint", "tiny-random", "--target", "tflite"), "invalid choice")
    _one_line_error(cli("--checkpoint", "tiny-random", "--fp8-vision", "--out", tmp_path / "o"), "--fp8-vision needs --fp8")
    _one_line_error(cli("--checkpoint", "tiny-random", "--target", "trtllm", "--fp8", "--calibration", "0", "--out", tmp_path / "o"),
                    "--calibration N > 0")


def test_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _one_line_error(cli("--checkpoint", "tiny-random", "--out", blocker / "engine"), "cannot write the output directory")
    _one_line_error(cli("--checkpoint", "tiny-random", "--out", blocker), "exists and is not a directory")


def test_existing_output_needs_force(cli, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _one_line_error(cli("--checkpoint", "tiny-random", "--out", out, "--calibration", "0"), "not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "engine.json").exists()
    # --force replaces an earlier export only, never a folder of other files (found: `--out "" --force`
    # replaced the current directory)
    _one_line_error(cli("--checkpoint", "tiny-random", "--out", out, "--calibration", "0", "--force"), "holds no earlier export")
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert cli("--checkpoint", "tiny-random", "--out", out, "--calibration", "0").returncode == 0
    (out / "stale.txt").write_text("from the earlier export")
    proc = cli("--checkpoint", "tiny-random", "--out", out, "--calibration", "0", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "engine.json").exists() and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary or old directories left behind


def test_the_current_directory_is_never_the_output(cli, tmp_path):
    """An empty --out is refused by the parser; the current directory, or one holding it, even with --force."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    _one_line_error(cli("--checkpoint", "tiny-random", "--out", "", "--force", cwd=work), "--out", "must not be empty")
    for out in (".", str(work), ".."):
        _one_line_error(cli("--checkpoint", "tiny-random", "--out", out, "--force", "--calibration", "0", cwd=work), "holds the current directory")
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("target", ["trtllm", "trtllm-legacy", "hf", "onnx"])
def test_single_targets_write_only_their_directory(cli, tmp_path, target):
    out = tmp_path / target
    proc = cli("--checkpoint", "tiny-random", "--out", out, "--target", target, "--calibration", "0")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([target, "export_report.json"])
    main_file = {"trtllm": "tte_trtllm.json", "trtllm-legacy": "rank0.safetensors", "hf": "model.safetensors", "onnx": "embed.onnx"}[target]
    assert (out / target / main_file).is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["targets"] == [target] and target in report and "native" not in report
    # no step is announced that did not run: nothing is built, and the summary says so
    steps = [line for line in proc.stdout.splitlines() if line.startswith("tte-export: ")]
    assert not any("build" in line for line in steps), steps
    assert set(report["seconds"]) - {"total"} == {line[len("tte-export: "):-len(" ...")] for line in steps}
    summary = proc.stdout[proc.stdout.index("exported "):].splitlines()
    assert len(summary) <= 24 and max(len(line) for line in summary) <= 200  # one screen
    if target == "trtllm":
        assert "NOT run here" in proc.stdout
    elif target == "trtllm-legacy":
        assert "engine NOT built" in proc.stdout
    elif target == "onnx":
        assert "max |onnxruntime - torch|" in proc.stdout


def test_legacy_per_channel_fp8_is_refused(cli, tmp_path):
    """TensorRT-LLM 1.x cannot build Qwen2-VL with FP8_PER_CHANNEL_PER_TOKEN: refused up front, nothing written."""
    proc = cli("--checkpoint", "tiny-random", "--out", tmp_path / "o", "--target", "trtllm-legacy", "--fp8", "--trtllm-fp8", "per-channel")
    _one_line_error(proc, "per-channel cannot build for Qwen2-VL")
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_nothing_that_loads(tmp_path, monkeypatch):
    """A failure after the native engine was written (here: in the ONNX step) leaves neither the output nor a temp dir."""
    import tte_engine.export.onnx_export as onnx_export

    def boom(*_a, **_k):
        raise RuntimeError("simulated failure during the ONNX export")

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    out = tmp_path / "half"
    with pytest.raises(RuntimeError, match="simulated"):
        run_export(ExportOptions(checkpoint="tiny-random", out=out, target="all", calibration=0))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        Engine(out)


def test_sigterm_mid_export_leaves_nothing(tmp_path, monkeypatch, capsys):
    """timeout, docker stop and CI cancels send SIGTERM: the temporary directory goes as on Ctrl-C."""
    import signal

    import tte_engine.export.onnx_export as onnx_export
    from tte_engine.export.cli import main

    def terminated(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the export")

    monkeypatch.setattr(onnx_export, "export_onnx", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--checkpoint", "tiny-random", "--out", str(tmp_path / "out"), "--target", "all", "--calibration", "0", "--quiet"]) == 143
    assert "terminated; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_the_commit_waits_for_it(tmp_path, monkeypatch, capsys):
    """--force over an old export: a SIGTERM between moving the old one aside and moving the new one
    in must neither hide the old export nor leave either directory behind; the commit finishes."""
    import signal
    import threading

    import tte_engine.export.pipeline as pipeline
    from tte_engine.export.cli import main

    out = tmp_path / "out"
    args = ["--checkpoint", "tiny-random", "--out", str(out), "--target", "hf", "--calibration", "0", "--quiet"]
    assert main(args) == 0
    real_commit = pipeline.commit_output

    def interrupted_commit(tmp, dest):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the commit
        real_commit(tmp, dest)

    monkeypatch.setattr(pipeline, "commit_output", interrupted_commit)
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "hf" / "model.safetensors").is_file()
    done = []  # and off the main thread, where no handler can be set, it still runs
    worker = threading.Thread(target=lambda: done.append(main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])))
    worker.start()
    worker.join()
    assert done == [2]


def test_errors_are_raised_as_export_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown target"):
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "x", target="tflite"))
    with pytest.raises(ExportError, match="kv-cache-fp8"):
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "x", kv_cache_fp8=True))
    with pytest.raises(ExportError, match="--fp8 does not apply to --target onnx"):
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "x", target="onnx", fp8=True))
    assert not (tmp_path / "x").exists()


def test_alias_resolves_from_the_hugging_face_cache(make_checkpoint, tmp_path, monkeypatch):
    """unified-2b with no $TTE_HOME copy resolves to a cached hub snapshot (files are symlinks to blobs, as the hub cache lays them out)."""
    src = make_checkpoint("hfcache", head="last_token")
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f.name
        shutil.copy2(f, blob)
        (snap / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("unified-2b") == snap
    assert resolve_checkpoint("Qwen/Qwen2-VL-2B-Instruct") == snap
    summary = run_export(ExportOptions(checkpoint="unified-2b", out=tmp_path / "eng", calibration=0))
    assert summary["source"] == str(snap)
    spec = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert spec["source"]["name"] == "unified-2b" and (tmp_path / "eng" / "tokenizer.json").is_file()
    assert not (tmp_path / "eng" / "tokenizer.json").is_symlink()  # copied, not linked into the cache


def test_random_init_specs_have_the_real_dimensions():
    """--random-init unified-2b / -7b build Qwen2-VL-2B / -7B shapes (checked on shapes only: building them is too big for CI)."""
    from tte_engine.model.names import checkpoint_shapes, head_shapes
    from tte_engine.random_checkpoint import ARCH_SPECS, SPECS, SPECIAL_TOKENS, model_config_for

    assert not set(ARCH_SPECS) & set(SPECS)  # never generated implicitly by Engine("unified-2b")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    expect = {"unified-2b": (1536, 28, 12, 2, 8960, 151936, True, 2.21e9), "unified-7b": (3584, 28, 28, 4, 18944, 152064, False, 8.29e9)}
    for name, (d, layers, heads, kv, inter, vocab, tied, params) in expect.items():
        spec = ARCH_SPECS[name]
        cfg = model_config_for(spec, spec.vocab_size, ids)
        t, v = cfg.text, cfg.vision
        assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size, t.tie_word_embeddings) == (
            d, layers, heads, kv, inter, vocab, tied)
        assert t.mrope_section == (16, 24, 24) and t.head_dim == 128
        assert (v.depth, v.embed_dim, v.num_heads, v.out_hidden_size) == (32, 1280, 16, d)
        assert spec.head == "mhsa" and spec.head_layers == 8
        count = sum(_numel(s) for s in checkpoint_shapes(cfg).values())
        assert abs(count - params) / params < 0.01, count  # the published parameter counts
        assert sum(_numel(s) for s in head_shapes(cfg, 8).values()) > 0


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_checkpoint_inside_the_output_is_refused(make_checkpoint, tmp_path):
    """--out holding the source checkpoint is refused even with --force (replacing it would delete the source)."""
    out = tmp_path / "out"
    shutil.copytree(make_checkpoint("inside", head="last_token"), out / "ckpt")
    for source in (out / "ckpt", out / "ckpt" / ".." / "ckpt"):
        with pytest.raises(ExportError, match="lies inside the output directory") as exc:
            run_export(ExportOptions(checkpoint=str(source), out=out, force=True, calibration=0))
        assert "\n" not in str(exc.value)
    with pytest.raises(ExportError, match="lies inside the output directory"):
        run_export(ExportOptions(checkpoint=str(out / "ckpt"), out=out / "ckpt", force=True, calibration=0))
    with pytest.raises(ExportError, match="lies inside the checkpoint"):  # and the other way round
        run_export(ExportOptions(checkpoint=str(out / "ckpt"), out=out / "ckpt" / "sub", calibration=0))
    assert (out / "ckpt" / "tte_config.json").is_file() and (out / "ckpt" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["ckpt"]


def test_a_failed_commit_puts_the_old_export_back(tmp_path):
    from tte_engine.export.pipeline import commit_output

    out = tmp_path / "engine"
    out.mkdir()
    (out / "engine.json").write_text("old")
    with pytest.raises(OSError):
        commit_output(tmp_path / ".engine.tmp-missing", out)  # the rename of the new export fails
    assert (out / "engine.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["engine"]
    new = tmp_path / ".engine.tmp-1"
    new.mkdir()
    (new / "engine.json").write_text("new")
    commit_output(new, out)
    assert (out / "engine.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_random_checkpoint_builds_clean_up_and_tolerate_a_concurrent_builder(tmp_path, monkeypatch):
    """--random-init / random aliases build into a temporary sibling: removed on failure or Ctrl-C, dropped if another process won."""
    import tte_engine.random_checkpoint as rc

    target = tmp_path / "models" / "random" / "unified-2b-seed0"
    spec = rc.ARCH_SPECS["unified-2b"]

    def interrupted(path, *_a, **_k):
        path.mkdir(parents=True)
        (path / "model-00001-of-00003.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(rc, "build_random_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rc.ensure_random_checkpoint(target, spec, seed=0, dtype="bfloat16", shards=3)
    assert list(target.parent.iterdir()) == []

    def loses_the_race(path, *_a, **_k):
        for d, text in ((path, "ours"), (target, "theirs")):  # the other process finishes while we build
            d.mkdir(parents=True)
            (d / "tte_config.json").write_text(text)

    monkeypatch.setattr(rc, "build_random_checkpoint", loses_the_race)
    assert rc.ensure_random_checkpoint(target, spec, seed=0, dtype="bfloat16", shards=3) == target
    assert (target / "tte_config.json").read_text() == "theirs" and [p.name for p in target.parent.iterdir()] == [target.name]
    monkeypatch.setattr(rc, "build_random_checkpoint", interrupted)  # complete already: nothing is built again
    assert rc.ensure_random_checkpoint(target, spec) == target


def test_random_init_goes_through_the_safe_builder(monkeypatch):
    """--random-init unified-2b: built (bf16, sharded by its parameter count) by ensure_random_checkpoint, not built twice."""
    import tte_engine.export.pipeline as pipeline
    from tte_engine.random_checkpoint import ARCH_SPECS, tte_home

    calls, said = [], []
    monkeypatch.setattr(pipeline, "ensure_random_checkpoint", lambda path, spec, **kw: calls.append((path, spec, kw)) or path)
    path, random_weights = pipeline.resolve_source(ExportOptions(checkpoint="unified-2b", random_init=True, seed=3), pipeline.Reporter(say=said.append))
    assert random_weights and path == tte_home() / "models" / "random" / "unified-2b-seed3"
    assert calls == [(path, ARCH_SPECS["unified-2b"], {"seed": 3, "dtype": "bfloat16", "shards": 3})]  # 4.1 GiB of model weights
    assert len(said) == 1 and "~4.8 GiB" in said[0]  # + the 8-layer mhsa head


def _parse_error(capsys, argv, *fragments):
    """tte-export ARGV stops at the parser: exit 2, one line naming what is wrong, nothing written."""
    from tte_engine.export.cli import main

    assert_usage_error(capsys, main, "tte-export", argv, *fragments)


@pytest.mark.parametrize("flag, value", [(f, v) for f in ("--max-batch-size", "--max-input-len") for v in ("0", "-3", "1.5", "1e3", "x", "9" * 30)]
                         + [("--calibration", v) for v in ("-1", "2.5", "100000000000")] + [("--seed", v) for v in ("-1", "4294967296")])
def test_numeric_options_are_checked_by_the_parser(capsys, tmp_path, flag, value):
    """`--max-batch-size 0` for trtllm was accepted (and written into tte_trtllm.json); --calibration 1e11 ran out of memory."""
    _parse_error(capsys, ["--checkpoint", "tiny-random", "--target", "trtllm", "--out", tmp_path / "o", flag, value],
                 f"argument {flag}: must be an integer from", f"got {value!r}")
    assert not (tmp_path / "o").exists()


def test_options_that_would_be_ignored_are_refused(capsys, tmp_path):
    base = ["--checkpoint", "tiny-random", "--out", tmp_path / "o"]
    for extra in (["--max-batch-size", "8"], ["--max-input-len", "100"], ["--target", "hf", "--fp8", "--trtllm-fp8", "per-channel"]):
        _parse_error(capsys, base + extra, "applies to the TensorRT-LLM targets only")
    _parse_error(capsys, base + ["--target", "trtllm", "--trtllm-fp8", "per-channel"], "--trtllm-fp8 needs --fp8")
    _parse_error(capsys, ["--checkpoint", "", "--out", tmp_path / "o"], "argument --checkpoint: must not be empty")
    _parse_error(capsys, base + ["--device", "gpu0"], "argument --device: must be cpu, cuda or cuda:N")
    with pytest.raises(ExportError, match="--seed applies to --random-init with an architecture alias"):  # tiny-random is always seed 0
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "o", seed=3, random_init=True))
    with pytest.raises(ExportError, match="--max-batch-size must be an integer from 1 to"):  # the Python API checks the same ranges
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "o", target="trtllm", max_batch_size=0))
    if not torch.cuda.is_available():  # was the load's ValueError, prefixed with the checkpoint's path as if it were at fault
        with pytest.raises(ExportError, match=r"^--device cuda: this torch build .* sees no CUDA device; use --device cpu$"):
            run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "o", device="cuda"))
    assert not (tmp_path / "o").exists()


def _with_tte_config(tmp_path, **changes) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint("tiny-random"), ckpt)
    config = json.loads((ckpt / "tte_config.json").read_text())
    for key, value in changes.items():
        if key == "default_instruction":
            config["instructions"]["default"] = value
        else:
            config[key] = value
    (ckpt / "tte_config.json").write_text(json.dumps(config))
    return ckpt


@pytest.mark.parametrize("target", ["native", "trtllm", "onnx"])
def test_an_over_long_embed_suffix_or_instruction_is_a_configuration_error(capsys, tmp_path, target):
    """An embed suffix longer than the model's context exited 1 ("ValueError: max_model_len ..."); a default
    instruction that leaves no room was exported (ONNX: killed for memory tracing a 20000-token prompt).
    Both are the checkpoint's configuration: exit 2, one line naming tte_config.json."""
    from tte_engine.export.cli import main

    out = tmp_path / "o"
    for changes, fragment in (({"embed_suffix": "word " * 5000}, "holds no item"),
                              ({"default_instruction": "word " * 5000}, "the default instruction leaves no room")):
        ckpt = _with_tte_config(tmp_path, **changes)
        assert main(["--checkpoint", str(ckpt), "--out", str(out), "--target", target, "--calibration", "0", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"tte-export: error: {ckpt}") and fragment in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
        shutil.rmtree(ckpt)


def test_a_context_longer_than_the_model_is_refused_for_tensorrt_llm(capsys, tmp_path):
    """--max-input-len + trace budget + embed tail past max_position_embeddings (4096 here) was written as max_seq_len."""
    from tte_engine.export.cli import main

    ckpt = _with_tte_config(tmp_path, embed_suffix="word " * 1000)  # fits the model, not with a 2048-token prompt
    out = tmp_path / "o"
    for argv, fragment in ((["--max-input-len", "2048"], "--max-input-len 2048: with the trace budget (16), the think end and embed suffix (4001)"),
                           (["--max-input-len", "4096"], "more than the model's 4096 (max_position_embeddings); give --max-input-len 78 at the most"),
                           (["--max-input-len", "5"], "--max-input-len 5 holds no prompt")):
        for target in ("trtllm", "trtllm-legacy"):
            assert main(["--checkpoint", str(ckpt), "--out", str(out), "--target", target, "--calibration", "0", "--quiet", *argv]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--target", "trtllm", "--calibration", "0", "--quiet", "--max-input-len", "64"]) == 0
    assert json.loads((out / "trtllm" / "tte_trtllm.json").read_text())["llm_args"]["max_seq_len"] == 64 + 16 + 4001 + 1
    # found by an attacker: without --max-input-len, its default 2048 was refused; it is fitted to the model instead
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--target", "trtllm", "--calibration", "0", "--quiet", "--force"]) == 0
    assert json.loads((out / "trtllm" / "tte_trtllm.json").read_text())["llm_args"]["max_seq_len"] == 4096


def test_a_trace_budget_near_the_model_length_exports_natively(capsys, tmp_path):
    """The native runtime shortens a trace to what the context leaves: a budget of nearly the whole model
    exports (a reviewer found it refused for every target); TensorRT-LLM, sized for the whole budget, refuses it."""
    from tte_engine.export.cli import main

    ckpt = _with_tte_config(tmp_path, think={"start": "<think>", "end": "</think>", "max_tokens": 4090})
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "native"), "--calibration", "0", "--quiet"]) == 0
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "trt"), "--target", "trtllm", "--calibration", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "for TensorRT-LLM the model's context of 4096 tokens leaves" in err and "lower think.max_tokens" in err, err
    assert not (tmp_path / "trt").exists()


def test_an_unexpected_failure_is_one_line_with_exit_1(tmp_path, monkeypatch, capsys):
    """Any exception during the export (not only OSError / RuntimeError / ValueError) is one line, never a traceback."""
    import tte_engine.export.onnx_export as onnx_export
    from tte_engine.export.cli import main

    def boom(*_a, **_k):
        raise KeyError("simulated bug")

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    assert main(["--checkpoint", "tiny-random", "--out", str(tmp_path / "o"), "--target", "onnx", "--quiet"]) == 1
    assert capsys.readouterr().err == "tte-export: error: KeyError: 'simulated bug'\n" and list(tmp_path.iterdir()) == []
