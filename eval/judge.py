"""One OpenAI-compatible client for the GPT judges (MM-Vet grader, LLaVA-Bench reviewer).

Judge scores drift with the judge model and every call costs money, so: the model is never defaulted (the result
JSON records which one graded), every reply is cached on disk the moment it arrives (a killed or failed run resumes
without re-asking), and failed requests are retried a bounded number of times with exponential backoff before the
run stops with an error that names the server and the last failure.

Configuration: ``--judge-model`` / ``JUDGE_MODEL``, ``--judge-base-url`` / ``OPENAI_BASE_URL`` (any
OpenAI-compatible server: OpenAI, Azure's v1 endpoint, vLLM, ...), API key from ``OPENAI_API_KEY``. ``openai`` is
imported only when the first request is made, so the scorers' other modes work without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.common import append_jsonl, iter_jsonl, split_unfinished

ENV_MODEL = "JUDGE_MODEL"
ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_API_KEY = "OPENAI_API_KEY"

# HTTP statuses worth another try: timeouts, conflicts, rate limits, server errors.
RETRY_STATUSES = frozenset({408, 409, 429})


class JudgeError(RuntimeError):
    """The judge could not be configured or did not answer; the message says what to fix."""


@dataclass(frozen=True)
class JudgeSettings:
    model: str
    api_key: str = field(repr=False)
    base_url: str | None = None
    max_attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise JudgeError(f"--judge-max-attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise JudgeError("judge backoff must be >= 0 and the timeout > 0")


def resolve_settings(
    model: str | None = None,
    base_url: str | None = None,
    *,
    max_attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 120.0,
    environ: dict[str, str] | None = None,
) -> JudgeSettings:
    """Settings from flags, falling back to the environment; refuses to guess a model or a key."""
    env = os.environ if environ is None else environ
    model = model or env.get(ENV_MODEL)
    if not model:
        raise JudgeError(
            f"no judge model configured: pass --judge-model (or set {ENV_MODEL}), e.g. gpt-4-0613 for MM-Vet's "
            "official grader; scores depend on the judge, so there is no default"
        )
    base_url = base_url or env.get(ENV_BASE_URL) or None
    api_key = env.get(ENV_API_KEY)
    if not api_key:
        where = f"the server at {base_url}" if base_url else "the OpenAI API"
        raise JudgeError(
            f"no API key for {where}: set {ENV_API_KEY} (a local OpenAI-compatible server that ignores keys "
            f"still needs a placeholder, e.g. {ENV_API_KEY}=EMPTY)"
        )
    return JudgeSettings(
        model=model,
        api_key=api_key,
        base_url=base_url,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        timeout_s=timeout_s,
    )


def request_key(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
    """Stable hash of everything that determines a reply (a retry at another temperature is another request)."""
    canonical = json.dumps(
        {"model": model, "messages": messages, "temperature": float(temperature), "max_tokens": int(max_tokens)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSON-lines file of judge replies keyed by :func:`request_key`.

    Each reply is appended and flushed as soon as it arrives, so only the line being written when a run is killed
    can be damaged; such a truncated last line is skipped with a warning, a damaged line elsewhere is an error.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._replies: dict[str, str] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        finished, unfinished = split_unfinished(self.path.read_bytes())
        records = list(iter_jsonl(self.path, finished.decode("utf-8"), error=JudgeError))
        number = finished.count(b"\n") + 1
        try:
            tail = iter_jsonl(self.path, unfinished.decode("utf-8"), error=JudgeError)
            records += [(number, record) for _, record in tail]
        except (JudgeError, UnicodeDecodeError):
            print(f"warning: {self.path}:{number}: truncated last cache line ignored", file=sys.stderr)
        for number, record in records:
            if not isinstance(record, dict) or "key" not in record or "reply" not in record:
                raise JudgeError(f"{self.path}:{number}: judge cache line lacks 'key' or 'reply'")
            self._replies[record["key"]] = record["reply"]

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, reply: str, request: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, {"key": key, "reply": reply, **request})
        self._replies[key] = reply


class Judge:
    """Chat completions with a disk cache and bounded retries.

    ``requests`` counts HTTP calls actually made and ``cache_hits`` replies served from the cache, so a resumed
    run can show that it did not re-ask.
    """

    def __init__(
        self,
        settings: JudgeSettings,
        cache_path: str | Path | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self._sleep = sleep
        self._client: Any = None
        self.requests = 0
        self.cache_hits = 0

    @property
    def model(self) -> str:
        return self.settings.model

    def describe(self) -> dict[str, Any]:
        """What graded the results; goes into the result JSON."""
        return {"model": self.settings.model, "base_url": self.settings.base_url or "https://api.openai.com/v1"}

    def complete(self, messages: list[dict[str, str]], *, temperature: float = 0.0, max_tokens: int = 1024) -> str:
        """The reply text for ``messages``, from the cache when this exact request was answered before."""
        key = request_key(self.settings.model, messages, temperature, max_tokens)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
        reply = self._ask_with_retries(messages, temperature, max_tokens)
        if self.cache is not None:
            request = {"model": self.settings.model, "temperature": temperature, "max_tokens": max_tokens}
            self.cache.put(key, reply, {**request, "messages": messages})
        return reply

    def _client_or_build(self) -> Any:
        if self._client is None:
            import openai  # optional dependency (extra "judge"); imported only when a request is made

            # Retries are ours (bounded, logged, tested), so the client's own are switched off.
            self._client = openai.OpenAI(
                api_key=self.settings.api_key,
                base_url=self.settings.base_url,
                timeout=self.settings.timeout_s,
                max_retries=0,
            )
        return self._client

    def _ask_with_retries(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
        import openai

        client = self._client_or_build()
        last: Exception | None = None
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                self.requests += 1
                response = client.chat.completions.create(
                    model=self.settings.model,
                    messages=messages,
                    temperature=temperature,
                    max_tokens=max_tokens,
                )
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
                last = err
            except openai.APIStatusError as err:
                if err.status_code not in RETRY_STATUSES:
                    raise JudgeError(
                        f"judge request refused by {self.describe()['base_url']} (model {self.settings.model}): "
                        f"HTTP {err.status_code}: {err.message}"
                    ) from err
                last = err
            else:
                if not response.choices:
                    raise JudgeError(f"judge {self.settings.model} returned no choices")
                return response.choices[0].message.content or ""
            if attempt < self.settings.max_attempts:
                delay = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempt - 1))
                print(
                    f"judge request failed ({type(last).__name__}: {last}); retry {attempt}/"
                    f"{self.settings.max_attempts - 1} in {delay:.1f}s",
                    file=sys.stderr,
                )
                self._sleep(delay)
        raise JudgeError(
            f"judge request to {self.describe()['base_url']} (model {self.settings.model}) failed "
            f"{self.settings.max_attempts} times; last error: {type(last).__name__}: {last}. "
            "Replies so far are cached; rerun the same command to resume."
        )


def add_judge_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GPT judge (OpenAI-compatible)")
    group.add_argument("--judge-model", default=None, help=f"judge model name (default: ${ENV_MODEL}; required)")
    group.add_argument(
        "--judge-base-url", default=None, help=f"OpenAI-compatible base URL (default: ${ENV_BASE_URL} or OpenAI)"
    )
    group.add_argument(
        "--judge-cache",
        default=None,
        help="JSON-lines cache of judge replies (default: next to the output, '<output>.judge-cache.jsonl')",
    )
    group.add_argument("--judge-max-attempts", type=int, default=5, help="tries per request before giving up")
    group.add_argument("--judge-backoff", type=float, default=2.0, help="first retry delay in seconds (doubles)")
    group.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")


def judge_from_args(args: argparse.Namespace, default_cache: str | Path) -> Judge:
    settings = resolve_settings(
        args.judge_model,
        args.judge_base_url,
        max_attempts=args.judge_max_attempts,
        backoff_s=args.judge_backoff,
        timeout_s=args.judge_timeout,
    )
    return Judge(settings, args.judge_cache or default_cache)


def default_cache_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".judge-cache.jsonl")
