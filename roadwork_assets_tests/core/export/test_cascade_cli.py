"""`roadwork predict` and `roadwork verify` on a real cascade bundle: one JSON line per
image with its stage, images of any size and format, and one-line refusals."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.cli import main
from roadwork_assets_tests.core.export.test_cascade_bundle import HOSTILE


def _images(tmp_path) -> list:
    """Real files Pillow writes: JPEG of odd and large sizes, PNG (RGB, RGBA, palette with
    transparency, 16-bit grey), WebP (lossy and with alpha)."""
    rng = np.random.default_rng(3)

    def noise(w, h, channels=3):
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)

    out = []

    def save(name, image, **kw):
        path = tmp_path / name
        image.save(path, **kw)
        out.append(path)

    save("odd.jpg", Image.fromarray(noise(333, 127)), quality=90)
    save("large.jpeg", Image.fromarray(noise(3001, 1999)), quality=80)
    save("tiny.jpg", Image.fromarray(noise(7, 5)))
    save("rgb.png", Image.fromarray(noise(64, 48)))
    save("rgba.png", Image.fromarray(noise(50, 90, 4), mode="RGBA"))
    palette = Image.fromarray(noise(41, 41)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    save("palette.png", palette, transparency=0)
    save("grey16.png", Image.fromarray(rng.integers(0, 65535, (30, 70), dtype=np.uint16)))
    save("photo.webp", Image.fromarray(noise(200, 120)), quality=80)
    save("alpha.webp", Image.fromarray(noise(99, 77, 4), mode="RGBA"), lossless=True)
    return out


def test_predict_prints_one_line_per_image_with_its_stage(cascade_bundle, tmp_path, capsys):
    paths = _images(tmp_path)
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert Image.open(tmp_path / "alpha.webp").format == "WEBP"
    assert main(["predict", "--bundle", str(cascade_bundle.directory), *map(str, paths)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in paths]
    for line in lines:
        assert set(line) == {"path", "probability", "decision", "stage"}
        assert line["stage"] in {1, 2} and line["decision"] in {"positive", "negative"}
        assert 0.0 <= line["probability"] <= 1.0 and line["probability"] != 0.5
        # the validator binarises with np.round (0.5 -> 0): it must read the decision
        assert int(np.round(line["probability"])) == (line["decision"] == "positive")


def test_verify_reports_a_cascade_bundle(cascade_bundle, capsys):
    assert main(["verify", str(cascade_bundle.directory)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["policy_kind"], out["stages"], out["onnx_checked"]) == (
        True, "cascade", 2, True)
    assert {"stage2", "stage2_onnx"} <= set(out["files"])


@pytest.mark.parametrize("case", ["edited_stage2", "stage2_of_another_checkpoint",
                                  "missing_stage2_onnx"])
def test_verify_and_predict_refuse_a_broken_cascade_bundle(case, cascade_bundle, tmp_path,
                                                           capsys):
    make, message = HOSTILE[case]
    copy = tmp_path / "b"
    shutil.copytree(cascade_bundle.directory, copy)
    make(copy, tmp_path)
    image = tmp_path / "street.png"
    Image.new("RGB", (40, 40), (120, 90, 30)).save(image)
    for argv in (["verify", str(copy)], ["predict", "--bundle", str(copy), str(image)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.out == ""  # nothing served
        lines = out.err.strip().splitlines()
        assert len(lines) == 1, out.err
        assert lines[0].startswith(f"roadwork {argv[0]}: error: bundle {copy}")
        assert re.search(message, lines[0])
