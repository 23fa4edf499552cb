"""eval.llavabench: GPT review against a local OpenAI-compatible server, resume, and the summary by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.llavabench import SYSTEM_PROMPT, build_content, load_rules, main, parse_scores
from tests.helpers import FakeOpenAIServer, write_jsonl

QUESTIONS = [
    {"question_id": 0, "image": "001.jpg", "text": "What dish is this?", "category": "conv"},
    {"question_id": 1, "image": "001.jpg", "text": "Describe the photo in detail.", "category": "detail"},
    {"question_id": 2, "image": "002.jpg", "text": "Why is the man smiling?", "category": "complex"},
    {"question_id": 3, "image": "002.jpg", "text": "What is he holding?", "category": "conv"},
    {"question_id": 4, "image": "002.jpg", "text": "Describe the scene.", "category": "detail"},
]
CONTEXT = [
    {"id": "001", "image": "001.jpg", "caption": "A bowl of ramen."},
    {"id": "002", "image": "002.jpg", "caption": ["A man holds a trophy.", "Confetti falls."]},
]
REFERENCE = [{"question_id": q, "text": f"reference {q}", "answer_id": f"r{q}"} for q in (4, 2, 0, 3, 1)]
ANSWERS = [
    {"question_id": 4, "text": "model 4", "answer_id": "m4", "tokens": {"visual_after": 50}},
    {"question_id": 3, "text": "", "answer_id": "m3", "error": "CUDA out of memory", "tokens": {}},
    {"question_id": 2, "text": "model 2", "answer_id": "m2", "tokens": {"visual_after": 70}},
    {"question_id": 1, "text": "model 1", "answer_id": "m1", "tokens": {"visual_after": 60}},
    {"question_id": 0, "text": "model 0", "answer_id": "m0", "tokens": {"visual_after": 40}},
]
# Judge replies by the model answer they review.
REPLIES = {
    "model 0": "8 6\nAssistant 2 misses the broth.",
    "model 1": "9, 9\nBoth are thorough.",
    "model 2": "7 7\nEqual.",
    "model 4": "Assistant 1 is better.\nNo scores here.",
    "model 3 again": "6 3\nShort.",
}


def model_answer_of(body: dict[str, Any]) -> str:
    content = body["messages"][1]["content"]
    return content.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]", 1)[0]


def judge_replies(body: dict[str, Any]) -> str:
    return REPLIES[model_answer_of(body)]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for name in ("JUDGE_MODEL", "OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "q": write_jsonl(tmp_path / "questions.jsonl", QUESTIONS),
        "c": write_jsonl(tmp_path / "context.jsonl", CONTEXT),
        "ref": write_jsonl(tmp_path / "answers_gpt4.jsonl", REFERENCE),
        "ans": write_jsonl(tmp_path / "ckpt.jsonl", ANSWERS),
        "out": tmp_path / "reviews" / "ckpt.jsonl",
        "result": tmp_path / "results" / "ckpt.json",
    }


def review_args(files: dict[str, Path], server: FakeOpenAIServer, *extra: str) -> list[str]:
    return [
        "--question", str(files["q"]), "--context", str(files["c"]),
        "--answer-list", str(files["ref"]), str(files["ans"]), "--output", str(files["out"]),
        "--result-json", str(files["result"]), "--judge-model", "judge-test",
        "--judge-base-url", server.base_url, "--judge-backoff", "0", *extra,
    ]  # fmt: skip


def reviews(files: dict[str, Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in files["out"].read_text().splitlines()]


def test_review_content_matching_and_summary(files: dict[str, Path]) -> None:
    with FakeOpenAIServer(judge_replies) as server:
        assert main(review_args(files, server)) == 0
        # The failed answer (question 3) is never sent to the judge.
        assert [model_answer_of(r) for r in server.requests] == ["model 0", "model 1", "model 2", "model 4"]
        sent = server.requests[2]
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("judge-test", 0.2, 1024)
    assert sent["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    rule = load_rules()["llava_bench_complex"]
    assert sent["messages"][1]["content"] == (
        "[Context]\nA man holds a trophy.\nConfetti falls.\n\n"
        "[Question]\nWhy is the man smiling?\n\n"
        "[Assistant 1]\nreference 2\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmodel 2\n\n[End of Assistant 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )
    lines = reviews(files)
    assert [(r["question_id"], r["tuple"]) for r in lines] == [
        (0, [8.0, 6.0]),
        (1, [9.0, 9.0]),
        (2, [7.0, 7.0]),
        (3, [None, 0.0]),
        (4, [-1.0, -1.0]),
    ]
    assert (lines[0]["answer1_id"], lines[0]["answer2_id"], lines[0]["category"]) == ("r0", "m0", "conv")
    assert lines[4]["parse_error"] is True and "error" in lines[3]

    result = json.loads(files["result"].read_text())
    metrics = result["metrics"]
    # all: reference [8, 9, 7] -> 8; model [6, 9, 7, 0] -> 5.5 (q4's unparsed review is left out of both).
    assert metrics["all"] == pytest.approx(
        {"relative": 68.75, "gpt4": 80.0, "model": 55.0, "count": 5, "parse_failures": 1, "answer_failures": 1}
    )
    assert metrics["conv"]["relative"] == pytest.approx(37.5)  # model (6 + 0) / 2 over reference 8
    assert metrics["detail"]["relative"] == pytest.approx(100.0)
    assert metrics["complex"]["relative"] == pytest.approx(100.0)
    assert result["headline"] == pytest.approx(68.75) and result["benchmark"] == "llavabench"
    assert result["tokens"] == {"visual_after": 55.0}
    assert result["judge"]["model"] == "judge-test"


def test_resume_after_judge_failure_and_late_answer(files: dict[str, Path]) -> None:
    def failing_on_question_2(body: dict[str, Any]) -> str | int:
        return 500 if model_answer_of(body) == "model 2" else judge_replies(body)

    with FakeOpenAIServer(failing_on_question_2) as server:
        assert main(review_args(files, server, "--judge-max-attempts", "2")) == 2
        assert len(server.requests) == 4  # q0, q1, then q2 twice
    assert [r["question_id"] for r in reviews(files)] == [0, 1]

    with FakeOpenAIServer(judge_replies) as server:
        assert main(review_args(files, server)) == 0
        assert [model_answer_of(r) for r in server.requests] == ["model 2", "model 4"]
    assert [r["question_id"] for r in reviews(files)] == [0, 1, 2, 3, 4]

    # Question 3 is answered later: the rerun reviews it, and the new line supersedes the placeholder.
    fixed = [a if a["question_id"] != 3 else {"question_id": 3, "text": "model 3 again", "answer_id": "m3b"}
             for a in ANSWERS]  # fmt: skip
    write_jsonl(files["ans"], fixed)
    with FakeOpenAIServer(judge_replies) as server:
        assert main(review_args(files, server)) == 0
        assert [model_answer_of(r) for r in server.requests] == ["model 3 again"]
    conv = json.loads(files["result"].read_text())["metrics"]["conv"]
    assert conv["relative"] == pytest.approx(100 * (6 + 3) / (8 + 6))
    assert conv["answer_failures"] == 0

    # Summary only, from the reviews file: the same numbers, no judge.
    summary = files["result"].with_name("summary.json")
    assert main(["-f", str(files["out"]), "--question", str(files["q"]), "--result-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["metrics"] == json.loads(files["result"].read_text())["metrics"]


def test_reviews_of_regenerated_answers_are_done_again(files: dict[str, Path]) -> None:
    with FakeOpenAIServer(judge_replies) as server:
        assert main(review_args(files, server)) == 0
    # the answers are regenerated (new answer ids; one new text): those reviews are stale, not resumed
    regenerated = [{**a, "answer_id": a["answer_id"] + "-new"} for a in ANSWERS if a["question_id"] != 3]
    regenerated[0]["text"] = "model 3 again"  # question 4 now answers differently
    write_jsonl(files["ans"], regenerated)
    with FakeOpenAIServer(judge_replies) as server:
        assert main(review_args(files, server)) == 0
        # unchanged texts come from the judge cache; only the new text reaches the server
        assert [model_answer_of(r) for r in server.requests] == ["model 3 again"]
    lines = reviews(files)
    assert sorted(r["question_id"] for r in lines) == [0, 1, 2, 3, 4]  # each question reviewed once
    assert {r["question_id"]: r["answer2_id"] for r in lines if r["question_id"] != 3} == {
        4: "m4-new",
        2: "m2-new",
        1: "m1-new",
        0: "m0-new",
    }
    assert next(r for r in lines if r["question_id"] == 4)["tuple"] == [6.0, 3.0]


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ("8 7", [8.0, 7.0]),
        ("8, 7\nexplanation", [8.0, 7.0]),
        ("  9   6.5 \n", [9.0, 6.5]),
        ("8/10 7/10", None),
        ("Assistant 1: 8", None),
        ("8 7 6", None),
        ("", None),
        ("\n8 7\nleading blank line", [8.0, 7.0]),
    ],
)
def test_parse_scores(reply: str, scores: list[float] | None) -> None:
    assert parse_scores(reply) == scores


def test_upstream_style_rule_file(files: dict[str, Path], tmp_path: Path) -> None:
    rules = {f"llava_bench_{c}": {"role": "Assistant", "prompt": f"RULE {c}"} for c in ("conv", "detail", "complex")}
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps(rules))
    with FakeOpenAIServer(judge_replies) as server:
        assert main([*review_args(files, server), "--rule", str(rule_file)]) == 0
        assert server.requests[0]["messages"][1]["content"].endswith("[System]\nRULE conv\n\n")
    assert build_content("c", "q", "a", "b", "Assistant", "p").startswith("[Context]\nc\n\n[Question]\nq\n\n")


def test_input_errors(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    with FakeOpenAIServer(judge_replies) as server:
        write_jsonl(files["ans"], [*ANSWERS, {"question_id": 9, "text": "?"}])
        assert main(review_args(files, server)) == 2
        assert "unknown question_id(s) ['9']" in capsys.readouterr().err

        write_jsonl(files["ans"], ANSWERS)
        write_jsonl(files["ref"], REFERENCE[1:])
        assert main(review_args(files, server)) == 2
        assert "question_id 4: no reference (GPT-4) answer" in capsys.readouterr().err

        write_jsonl(files["ref"], REFERENCE)
        write_jsonl(files["q"], [{**QUESTIONS[0], "category": "chat"}, *QUESTIONS[1:]])
        files["out"].unlink(missing_ok=True)
        assert main(review_args(files, server)) == 2
        assert "no rule for category 'chat'" in capsys.readouterr().err
        assert server.requests == []
    with pytest.raises(SystemExit):
        main(["-f", str(files["out"]), "--output", str(files["out"])])
