"""Helpers the test modules share: paths, images and the files they write. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "assets" / "llama2-tokenizer.model"
# openai/clip-vit-large-patch14(-336)'s preprocessor_config.json, written out as the expected values
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def random_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """Uniform noise, ``size`` = (width, height)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def save_image(path: Path, seed: int) -> None:
    """A noise image whose size varies with the seed (96-128 x 72-96), so batches mix shapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, (96 + 8 * (seed % 5), 72 + 12 * (seed % 3))).save(path)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line, UTF-8; the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[Any]:
    """Every line is one JSON value (a blank line fails: answers files have none)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SHORT = "\nAnswer the question using a single word or phrase."


def pope_fixture(root: Path) -> Path:
    """LLaVA's llava_pope_test.jsonl, POPE's coco/coco_pope_<category>.json label files and val2014/ images."""
    lines, qid = [], 1
    for c, category in enumerate(("adversarial", "popular", "random")):
        labels = []
        for n, (thing, label) in enumerate([("dog", "yes"), ("car", "no")]):
            image = f"COCO_val2014_{310196 + 10 * c + n:012d}.jpg"
            save_image(root / "val2014" / image, qid)
            text = f"Is there a {thing} in the image?"
            lines.append({"question_id": qid, "image": image, "text": text + SHORT, "category": category})
            labels.append({"question_id": n + 1, "image": image, "text": text, "label": label})  # POPE restarts ids
            qid += 1
        write_jsonl(root / "coco" / f"coco_pope_{category}.json", labels)
    return write_jsonl(root / "llava_pope_test.jsonl", lines)


Responder = Callable[[dict[str, Any]], "str | int"]


class FakeOpenAIServer:
    """``POST /v1/chat/completions`` answered by ``responder(request_body)``: a reply text, or an int HTTP status
    to fail with. Every request body is kept in ``requests``."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                outcome = server.responder(body)
                if isinstance(outcome, int):
                    return self._send(outcome, {"error": {"message": "simulated failure", "type": "server_error"}})
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": outcome},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def scienceqa_fixture(root: Path) -> None:
    """ScienceQA's problems.json and pid_splits.json, LLaVA's llava_test_CQM-A.json and images/test/: four questions
    (three with an image, hints on every other one)."""
    from eval.prepare_choice import sqa_prompt

    problems, questions = {}, []
    for n in range(4):
        pid = f"test_{n:05d}"
        hint = "" if n % 2 else "A hint."
        problems[pid] = {
            "question": f"Which option is number {n}?",
            "choices": ["one", "two", "three"],
            "answer": n % 3,
            "hint": hint,
            "image": None if n == 3 else "image.png",
            "subject": "natural science",
            "grade": "grade3",
            "split": "test",
        }
        value = sqa_prompt(problems[pid]["question"], hint, problems[pid]["choices"], has_image=n != 3)
        question = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if n != 3:
            question["image"] = f"{pid}/image.png"
            save_image(root / "images" / "test" / pid / "image.png", n)
        questions.append(question)
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"test": sorted(problems), "val": []})
    write_json(root / "llava_test_CQM-A.json", questions)


def markdown_cells(text: str) -> dict[str, dict[str, str]]:
    """A Markdown table as {first cell of a row: {column title: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


# ---- the LLM-side methods' workload (test_baselines_llm, test_schedules) -------------------------------------------
DEEP_LAYERS = 6
MIXED_SIZES = [(120, 90), (64, 160), (112, 112), (200, 50)]
MIXED_QUESTIONS = ["Is there a dog?", "What colour is the square in the middle of the picture?", "Count.", "Why?"]


def write_deep_llava(folder: Path) -> Path:
    """A tiny LLaVA-1.5 with DEEP_LAYERS decoder layers and grouped-query attention (two query heads per KV head)."""
    from llava.testing.tiny_llava import TinySpec, write_tiny_llava

    return write_tiny_llava(folder / "llava-v1.5-tiny-deep", TinySpec(layers=DEEP_LAYERS, kv_heads=2), seed=3)


def load_on_cpu(checkpoint: Path) -> tuple[Any, Any, Any]:
    """(tokenizer, model, image processor) of a local checkpoint, on the CPU."""
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(checkpoint), None, None, device="cpu")
    return tokenizer, model, processor


def mixed_images() -> list[Image.Image]:
    """One random image per MIXED_SIZES entry."""
    return [random_image(i, size) for i, size in enumerate(MIXED_SIZES)]


def batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, max_new_tokens: int) -> list:
    """The batch's greedy answers, after asserting that their texts and token statistics equal one run per sample."""
    from llava.inference import generate_answers

    batched = generate_answers(
        model, tokenizer, processor, prompts, images, max_new_tokens=max_new_tokens, pruning=pruning
    )
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=max_new_tokens, pruning=pruning)[0]
        for p, im in zip(prompts, images)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    return batched


def batch_inputs(model, tokenizer, processor, images, questions) -> tuple:
    """(input ids, attention mask, pixels, image sizes) of one image per question, vicuna_v1 prompts, left-padded with
    id 0 as the runners pad."""
    from llava.inference import build_prompt, left_pad
    from llava.mm_utils import process_images, tokenizer_image_token

    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in questions]
    input_ids, mask = left_pad([tokenizer_image_token(p, tokenizer) for p in prompts], 0)
    return input_ids, mask, process_images(images, processor, model.config), [image.size for image in images]
