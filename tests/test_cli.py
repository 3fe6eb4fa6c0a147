"""The command line: exit codes, one-line errors, and each subcommand end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from darknetpy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_darknet_table(capsys):
    assert main(["info", str(ROOT / "cfg" / "yolov3-tiny.cfg")]) == 0
    out = capsys.readouterr().out
    assert "Total BFLOPS" in out and "profile: pjreddie" in out
    assert "  16 yolo" in out and "  23 yolo" in out
    assert "416 x 416 x    3 ->  416 x 416 x   16" in out


def test_info_says_why_alexeyab(capsys):
    assert main(["info", str(ROOT / "cfg" / "yolov4-tiny.cfg")]) == 0
    assert "profile: alexeyab (AlexeyAB features: layer 3 [route]" in capsys.readouterr().out


def test_cfg_error_is_one_line_with_location(tmp_path, capsys):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nwidth=32\nheight=32\nchannels=3\n\n[convolutional]\nfilters=abc\n")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{bad}:7: layer 0 [convolutional]: key 'filters': bad value 'abc'" in err[0]


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "darknetpy", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("darknetpy ")


@pytest.fixture
def fastest(reference_dir):
    case = reference_dir / "cases" / "yolo-fastest-1.1_dog"
    return case, reference_dir / "weights" / "yolo-fastest-1.1.weights"


def test_verify_exit_codes(fastest, capsys):
    case, weights = fastest
    assert main(["verify", str(case / "model.cfg"), str(weights), str(case)]) == 0
    assert "131 layers compared, 0 failed" in capsys.readouterr().out
    # an absurd tolerance must make it fail (exit 1), with FAIL rows
    assert main(["verify", str(case / "model.cfg"), str(weights), str(case), "--rtol",
                 "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_dump_then_verify_plain_directory(fastest, tmp_path, capsys):
    case, weights = fastest
    out = tmp_path / "dump"
    import numpy as np
    np.save(tmp_path / "x.npy", np.load(case / "outputs.npz")["input"])
    assert main(["dump", str(case / "model.cfg"), str(weights), "--input",
                 str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    assert (out / "input.npy").exists() and (out / "layer_130.npy").exists()
    assert np.load(out / "layer_000.npy").shape == (8, 160, 160)
    assert main(["verify", str(case / "model.cfg"), str(weights), str(out)]) == 0


def test_export_and_verify_onnx(fastest, tmp_path, capsys):
    case, weights = fastest
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(case / "model.cfg"), str(weights), "-o", str(onnx_path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", str(onnx_path), str(case)]) == 0
    assert "2 layers compared, 0 failed" in capsys.readouterr().out


def test_convert_round_trip_is_byte_identical(reference_dir, tmp_path):
    cfg = reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg"
    src = reference_dir / "weights" / "yolo-fastest-1.1.weights"
    assert main(["convert", str(src), str(tmp_path / "w.safetensors"), "--cfg", str(cfg)]) == 0
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "w.weights"),
                 "--cfg", str(cfg)]) == 0
    assert (tmp_path / "w.weights").read_bytes() == src.read_bytes()


def test_cuda_request_without_gpu_is_a_clear_error(fastest, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the error on CPU-only machines")
    case, weights = fastest
    assert main(["verify", str(case / "model.cfg"), str(weights), str(case), "--device",
                 "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_detect_optimised_and_bf16_find_the_same_objects(reference_dir, tmp_path, capsys):
    cfg = reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg"
    weights = reference_dir / "weights" / "yolo-fastest-1.1.weights"
    image = reference_dir / "images" / "dog.jpg"
    names = []
    for extra in ([], ["--optimize"], ["--precision", "bf16"]):
        assert main(["detect", str(cfg), str(weights), str(image), "--out", "", *extra]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if "%" in line]
        names.append(sorted(line.split(":")[0] for line in lines))
    assert names[0] == names[1] == names[2]
    assert "dog" in names[0] and "bicycle" in names[0]


def test_unwritable_outputs_and_unreadable_models_are_one_line_errors(fastest, tmp_path, capsys):
    case, weights = fastest
    cfg = str(case / "model.cfg")
    (tmp_path / "adir").mkdir()
    cases = [
        ["convert", str(weights), str(tmp_path / "no" / "such" / "w.pt"), "--cfg", cfg],
        ["convert", str(weights), str(tmp_path / "adir"), "--cfg", cfg],
        ["export", cfg, str(weights), "-o", str(tmp_path / "no" / "m.onnx")],
        ["verify", str(tmp_path / "missing.onnx"), str(case)],
    ]
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    cases.append(["verify", str(tmp_path / "bad.onnx"), str(case)])
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("darknetpy: error: "), (args, err)
    assert list((tmp_path / "adir").iterdir()) == []  # nothing left behind
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
