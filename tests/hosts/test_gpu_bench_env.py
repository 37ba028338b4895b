"""bench/comfy_dynamic_vram.py on an offline GPU machine: the stand-ins it gives ComfyUI for what that
machine lacks (PyAV, comfy-kitchen, the frontend package) must let ComfyUI 0.2x import as it does with
the real packages, and must never shadow a package that is installed. A wrong stand-in costs a whole
GPU run, so it is checked here on the CPU."""

import subprocess
import sys

from bench import comfy_dynamic_vram as bench


def in_stubs(code: str) -> subprocess.CompletedProcess:
    """Run `code` with only bench/stubs ahead of the standard library (no real av / comfy_kitchen)."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(bench.STUBS)!r})\n{code}"],
                          capture_output=True, text=True)


def test_comfy_kitchen_stand_in_answers_every_availability_question_with_no():
    done = in_stubs("import comfy_kitchen as ck\n"
                    "assert ck.int8_attention_is_available() is False\n"
                    "assert ck.flash_attention_decode_is_available('cuda') is False\n"
                    "try:\n    ck.quantize_per_tensor_fp8\nexcept AttributeError as e:\n    print(e)\n"
                    "try:\n    from comfy_kitchen.tensor import QuantizedTensor\nexcept ImportError:\n"
                    "    print('quant_ops falls back')\n")
    assert done.returncode == 0, done.stderr
    assert "benchmark stand-in" in done.stdout and "quant_ops falls back" in done.stdout


def test_av_stand_in_has_what_comfyui_video_types_build_at_import():
    # comfy_api/latest/_input_impl/video_types.py (0.2x) maps enum members at module level
    done = in_stubs("from av.container import InputContainer\n"
                    "from av.subtitles.stream import SubtitleStream\n"
                    "from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc\n"
                    "table = {ColorTrc.BT709: 'sRGB', ColorTrc.IEC61966_2_1: 'sRGB', ColorTrc.ARIB_STD_B67: 'HDR'}\n"
                    "assert len(table) == 3 and ColorPrimaries.BT709 != ColorTrc.BT709\n"
                    "import av\n"
                    "try:\n    av.open\nexcept AttributeError:\n    print('real use raises')\n")
    assert done.returncode == 0, done.stderr
    assert "real use raises" in done.stdout


def test_only_missing_packages_get_a_stand_in_and_the_callers_pythonpath_is_kept(tmp_path, monkeypatch):
    fake_site = tmp_path / "site"
    (fake_site / "comfy_kitchen").mkdir(parents=True)
    (fake_site / "comfy_kitchen" / "__init__.py").write_text("")  # installed: must not be shadowed
    hidden = tmp_path / "hidden"
    for name in ("av", "comfyui_frontend_package"):  # missing on the machine
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text("raise ImportError('not installed')")
    monkeypatch.setenv("PYTHONPATH", f"{hidden}:{fake_site}")
    path, args, stand_ins = bench.server_environment(sys.executable, tmp_path / "work")
    assert stand_ins == ["av", "comfyui_frontend_package (empty --front-end-root)"]
    assert path[1:] == [str(hidden), str(fake_site)]
    assert sorted(p.name for p in (tmp_path / "work" / "stand-ins").iterdir()) == ["av"]
    assert args == ["--front-end-root", str(tmp_path / "work" / "frontend-empty")]
    assert (tmp_path / "work" / "frontend-empty").is_dir()


def test_nothing_is_added_where_everything_is_installed(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for name in ("av", "comfy_kitchen", "comfyui_frontend_package"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(site))
    path, args, stand_ins = bench.server_environment(sys.executable, tmp_path / "work")
    assert (path, args, stand_ins) == ([str(site)], [], [])


def test_the_dynamic_vs_legacy_comparison_finds_a_lora_saved_by_an_earlier_call(tmp_path):
    # one GPU call may run only `--modes default`, the next `--modes nodyn,...` with the same --work
    assert bench.lora_file(tmp_path, "sd15", "nodyn") is None
    saved = tmp_path / "base-sd15-nodyn" / "models" / "loras" / "dynvram" / "sd15_nodyn.safetensors"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    assert bench.lora_file(tmp_path, "sd15", "nodyn") == str(saved)
