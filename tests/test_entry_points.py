"""The command-line entry points work end to end on the tiny checkpoint and fail clearly on bad input."""

from __future__ import annotations

import io
import json

import pytest

from llava.eval import run_llava
from llava.serve import cli
from tests.helpers import random_image


def test_run_llava_answers_and_reports_tokens(tiny_ckpt, tmp_path, capsys):
    image = tmp_path / "view.png"
    random_image(3).save(image)
    answer = run_llava.main(
        [
            "--model-path",
            str(tiny_ckpt),
            "--image-file",
            str(image),
            "--query",
            "What is this?",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max_new_tokens",
            "5",
            "--show-tokens",
            "--visual-pruning",
            "topk",
            "--visual-topk",
            "9",
        ]
    )
    assert answer is None
    lines = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(lines[-1])
    assert stats["visual_before"] == 64 and stats["visual_after"] == 9
    assert 1 <= stats["generated"] <= 5


def test_run_llava_missing_image_names_the_path(tiny_ckpt, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(SystemExit, match="error: image file not found: .*nope.jpg"):
        run_llava.main(
            ["--model-path", str(tiny_ckpt), "--image-file", str(missing), "--query", "q", "--device", "cpu"]
        )


def test_run_llava_corrupt_image_names_the_path(tiny_ckpt, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(SystemExit, match="error: cannot read image .*broken.png"):
        run_llava.main(
            ["--model-path", str(tiny_ckpt), "--image-file", str(corrupt), "--query", "q", "--device", "cpu"]
        )


def test_cli_two_turns_then_eof(tiny_ckpt, tmp_path):
    image = tmp_path / "view.png"
    random_image(4).save(image)
    args = cli.parse_args(
        [
            "--model-path",
            str(tiny_ckpt),
            "--image-file",
            str(image),
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--show-tokens",
        ]
    )
    out = io.StringIO()
    replies = cli.chat(args, stdin=io.StringIO("What is it?\nAnd the colour?\n"), stdout=out)
    assert len(replies) == 2
    token_lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert token_lines[1]["prompt"] > token_lines[0]["prompt"]  # the second turn carries the first in its prompt
