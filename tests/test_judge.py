"""eval.judge through the real `openai` client against a local OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.judge import Judge, JudgeCache, JudgeError, JudgeSettings, request_key, resolve_settings
from tests.helpers import FakeOpenAIServer


def make_judge(server: FakeOpenAIServer, cache: Path | None, attempts: int = 3) -> Judge:
    settings = JudgeSettings(model="judge-test", api_key="sk-test", base_url=server.base_url, max_attempts=attempts)
    return Judge(settings, cache, sleep=lambda _s: None)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


MESSAGES = [{"role": "user", "content": "grade this"}]


def test_reply_request_fields_and_cache_resume(tmp_path: Path) -> None:
    with FakeOpenAIServer(lambda body: "0.7") as server:
        judge = make_judge(server, tmp_path / "cache.jsonl")
        assert judge.complete(MESSAGES, temperature=0.0, max_tokens=5) == "0.7"
        sent = server.requests[0]
        assert sent["model"] == "judge-test" and sent["messages"] == MESSAGES
        assert sent["temperature"] == 0.0 and sent["max_tokens"] == 5

        resumed = make_judge(server, tmp_path / "cache.jsonl")
        assert resumed.complete(MESSAGES, temperature=0.0, max_tokens=5) == "0.7"
        assert (resumed.requests, resumed.cache_hits) == (0, 1)
        assert len(server.requests) == 1
        # A different temperature is a different request, so it is asked.
        resumed.complete(MESSAGES, temperature=0.5, max_tokens=5)
        assert len(server.requests) == 2
    records = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in records] == [0.0, 0.5]
    assert records[0]["key"] == request_key("judge-test", MESSAGES, 0.0, 5)


def test_http_500_is_retried_then_answers(tmp_path: Path) -> None:
    outcomes = iter([500, 503, "8 7"])
    with FakeOpenAIServer(lambda body: next(outcomes)) as server:
        judge = make_judge(server, None, attempts=3)
        assert judge.complete(MESSAGES) == "8 7"
        assert judge.requests == 3 and len(server.requests) == 3


def test_retries_are_bounded_and_error_names_server(tmp_path: Path) -> None:
    with FakeOpenAIServer(lambda body: 500) as server:
        judge = make_judge(server, tmp_path / "c.jsonl", attempts=2)
        with pytest.raises(JudgeError, match=r"failed 2 times.*InternalServerError") as info:
            judge.complete(MESSAGES)
        assert server.base_url in str(info.value)
        assert len(server.requests) == 2
    assert not (tmp_path / "c.jsonl").exists()


def test_client_errors_are_not_retried() -> None:
    with FakeOpenAIServer(lambda body: 401) as server:
        judge = make_judge(server, None, attempts=4)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.complete(MESSAGES)
        assert len(server.requests) == 1


def test_backoff_doubles_and_is_capped() -> None:
    delays: list[float] = []
    with FakeOpenAIServer(lambda body: 429) as server:
        settings = JudgeSettings(
            model="m", api_key="k", base_url=server.base_url, max_attempts=5, backoff_s=1.0, max_backoff_s=3.0
        )
        with pytest.raises(JudgeError):
            Judge(settings, None, sleep=delays.append).complete(MESSAGES)
    assert delays == [1.0, 2.0, 3.0, 3.0]


def test_settings_need_model_and_key() -> None:
    with pytest.raises(JudgeError, match="--judge-model"):
        resolve_settings(environ={"OPENAI_API_KEY": "k"})
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        resolve_settings("gpt-4-0613", environ={})
    settings = resolve_settings(
        None, None, environ={"JUDGE_MODEL": "m1", "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://h/v1"}
    )
    assert (settings.model, settings.base_url, settings.api_key) == ("m1", "http://h/v1", "k")
    flags = resolve_settings("m2", "http://flag/v1", environ={"JUDGE_MODEL": "m1", "OPENAI_API_KEY": "sk-secret"})
    assert (flags.model, flags.base_url) == ("m2", "http://flag/v1")
    assert "sk-secret" not in repr(flags)


def test_cache_skips_truncated_last_line_but_not_a_damaged_middle(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "reply": "1"}) + "\n" + '{"key": "b", "rep')
    cache = JudgeCache(path)
    assert cache.get("a") == "1" and cache.get("b") is None and len(cache) == 1
    path.write_text('{"key": "b", "rep\n' + json.dumps({"key": "a", "reply": "1"}) + "\n")
    with pytest.raises(JudgeError, match=r"cache.jsonl:1"):
        JudgeCache(path)


def test_request_key_is_stable_and_sensitive() -> None:
    base = request_key("m", MESSAGES, 0.0, 16)
    assert base == request_key("m", [dict(MESSAGES[0])], 0, 16)
    assert base != request_key("m2", MESSAGES, 0.0, 16)
    assert base != request_key("m", [{"role": "user", "content": "other"}], 0.0, 16)
    assert base != request_key("m", MESSAGES, 0.2, 16)
