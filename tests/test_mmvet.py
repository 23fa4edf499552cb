"""eval.mmvet: the official grader's JSON, and GPT grading against a local OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.mmvet import build_prompt, load_prompt, main, parse_score
from tests.helpers import FakeOpenAIServer

QUESTIONS = [
    {"question_id": 0, "image": "v1_0.png", "text": "What is the total?", "category": "conv"},
    {"question_id": 1, "image": "v1_1.png", "text": "What is written?", "category": "conv"},
    {"question_id": 2, "image": "v1_2.png", "text": "Solve for x.", "category": "conv"},
    {"question_id": 3, "image": "v1_3.png", "text": "Who painted this?", "category": "conv"},
]
TRUTH = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["rec", "ocr"], "question": "What is the total?", "answer": "$5"},
    "v1_1": {"imagename": "v1_1.png", "capability": ["ocr"], "question": "What is written?", "answer": "hi<OR>hello"},
    "v1_2": {"imagename": "v1_2.png", "capability": ["math"], "question": "Solve for x.", "answer": "-1<AND>-5"},
    "v1_3": {"imagename": "v1_3.png", "capability": ["know"], "question": "Who painted this?", "answer": "Monet"},
}
ANSWERS = [
    {"question_id": 1, "prompt": "What is written?", "text": "It says hello.", "tokens": {"visual_after": 100}},
    {"question_id": 0, "prompt": "What is the total?", "text": "The total is $5.", "tokens": {"visual_after": 200}},
    {"question_id": 2, "prompt": "Solve for x.", "text": "", "error": "CUDA out of memory", "tokens": {}},
]


def write(tmp_path: Path, answers: list[dict[str, Any]] = ANSWERS) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("q.jsonl", "a.jsonl", "mm-vet.json")}
    paths["q.jsonl"].write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    paths["a.jsonl"].write_text("".join(json.dumps(a) + "\n" for a in answers))
    paths["mm-vet.json"].write_text(json.dumps(TRUTH))
    return paths


def prediction_of(body: dict[str, Any]) -> str:
    """The graded prediction: third cell of the prompt's last table row."""
    return body["messages"][-1]["content"].splitlines()[-1].split(" | ")[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for name in ("JUDGE_MODEL", "OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def grade_args(paths: dict[str, Path], server: FakeOpenAIServer, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--question-file", str(paths["q.jsonl"]), "--result-file", str(paths["a.jsonl"]), "--grade",
        "--mmvet-json", str(paths["mm-vet.json"]), "--result-json", str(tmp_path / "results" / "ckpt.json"),
        "--judge-model", "judge-test", "--judge-base-url", server.base_url, "--judge-backoff", "0", *extra,
    ]  # fmt: skip


def test_official_json_for_every_question(tmp_path: Path) -> None:
    paths = write(tmp_path)
    out = tmp_path / "upload" / "ckpt.json"
    assert main(["--question-file", str(paths["q.jsonl"]), "--src", str(paths["a.jsonl"]), "--dst", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "v1_0": "The total is $5.",
        "v1_1": "It says hello.",
        "v1_2": "",
        "v1_3": "",
    }


def test_grading_scores_capabilities_retries_and_resumes(tmp_path: Path) -> None:
    paths = write(tmp_path)
    failed_once: list[bool] = []

    def responder(body: dict[str, Any]) -> str | int:
        if not failed_once:
            failed_once.append(True)
            return 500
        prediction = prediction_of(body)
        if prediction == "The total is $5.":
            return "1.0"
        if prediction == "It says hello.":
            return "0.5" if body["temperature"] > 0 else "Partially correct."
        raise AssertionError(f"judge asked about {prediction!r}")

    with FakeOpenAIServer(responder) as server:
        assert main(grade_args(paths, server, tmp_path)) == 0
        # 500 + retry for v1_0; v1_1 unparsable at temperature 0, then 0.5. Failed/missing answers: never asked.
        assert [(prediction_of(r), r["temperature"]) for r in server.requests] == [
            ("The total is $5.", 0.0),
            ("The total is $5.", 0.0),
            ("It says hello.", 0.0),
            ("It says hello.", 0.5),
        ]
        sent = server.requests[-1]
        assert sent["model"] == "judge-test" and len(sent["messages"]) == 1
        assert sent["messages"][0]["content"].splitlines()[-1] == "What is written? | hi <OR> hello | It says hello. | "

        result = json.loads((tmp_path / "results" / "ckpt.json").read_text())
        assert result["benchmark"] == "mmvet" and result["count"] == 4
        assert result["headline"] == pytest.approx(37.5)
        metrics = result["metrics"]
        assert metrics["total"] == pytest.approx(37.5)
        assert (metrics["rec"], metrics["ocr"], metrics["math"], metrics["know"]) == pytest.approx((100, 75, 0, 0))
        assert "gen" not in metrics and "spat" not in metrics
        assert metrics["by_capability_set"] == pytest.approx({"math": 0, "know": 0, "ocr": 50, "ocr,rec": 100})
        assert (metrics["ok"], metrics["missing"], metrics["error"], metrics["parse_failure"]) == (2, 1, 1, 0)
        assert result["per_question"]["v1_2"]["status"] == "error"
        assert result["tokens"] == {"visual_after": 150.0}
        assert result["judge"]["model"] == "judge-test"

        before = len(server.requests)
        assert main(grade_args(paths, server, tmp_path)) == 0
        assert len(server.requests) == before  # every reply came from the cache
        assert json.loads((tmp_path / "results" / "ckpt.json").read_text())["headline"] == pytest.approx(37.5)


def test_unparsable_replies_are_bounded_and_score_zero(tmp_path: Path) -> None:
    paths = write(tmp_path, ANSWERS[:1])
    with FakeOpenAIServer(lambda body: "I cannot tell.") as server:
        assert main(grade_args(paths, server, tmp_path, "--grade-attempts", "3")) == 0
        assert [r["temperature"] for r in server.requests] == [0.0, 0.5, 1.0]
    result = json.loads((tmp_path / "results" / "ckpt.json").read_text())
    assert result["per_question"]["v1_1"]["status"] == "parse_failure"
    assert result["per_question"]["v1_1"]["replies"] == ["I cannot tell."] * 3
    assert result["metrics"]["total"] == 0.0 and result["metrics"]["parse_failure"] == 1


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("0.5", 0.5),
        (" 1.0.\n", 1.0),
        ("0", 0.0),
        (".7", 0.7),
        ("Correctness: 0.8", 0.8),
        ("0.3 because half is right", 0.3),
        ("10", None),
        ("1.5", None),
        ("", None),
        ("The prediction is wrong.", None),
        ("0.5/1", None),
    ],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == score


def test_prompt_is_few_shot_table_ending_with_the_sample() -> None:
    rules = load_prompt()
    prompt = build_prompt(rules, "Q?", "a<AND>b", "pred")
    lines = prompt.splitlines()
    assert lines[0] == rules["instruction"]
    assert "<AND>" in rules["instruction"] and "<OR>" in rules["instruction"]
    assert lines[2] == "Question | Ground truth | Prediction | Correctness"
    assert len(lines) == 5 + len(rules["examples"])  # instruction, blank, header, rule, examples, sample
    assert lines[-1] == "Q? | a <AND> b | pred | "
    assert all(line.count(" | ") == 3 for line in lines[2:])


def test_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write(tmp_path, [*ANSWERS, {"question_id": 99, "text": "?"}])
    assert main(["--question-file", str(paths["q.jsonl"]), "--result-file", str(paths["a.jsonl"]), "--dst", "x"]) == 2
    assert "unknown question_id 99" in capsys.readouterr().err

    paths = write(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY")
    args = ["--question-file", str(paths["q.jsonl"]), "--result-file", str(paths["a.jsonl"]), "--grade"]
    args += ["--mmvet-json", str(paths["mm-vet.json"]), "--result-json", str(tmp_path / "r.json")]
    assert main([*args, "--judge-model", "m"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert main(args) == 2
    assert "--judge-model" in capsys.readouterr().err

    truth = dict(TRUTH)
    del truth["v1_3"]
    paths["mm-vet.json"].write_text(json.dumps(truth))
    assert main([*args, "--judge-model", "m"]) == 2
    assert "no ground truth for 1 questions, e.g. ['v1_3']" in capsys.readouterr().err
