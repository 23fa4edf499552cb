"""The one runner core behind every question format (model_vqa_loader, model_vqa_science, model_vqa_mmbench, model_vqa).

A runner module only describes its question format (``QuestionFormat``): how to read a question file into
``Sample``s (question text, image, the answer fields it adds), its own flags and upstream's default generation
settings for it. Which benchmark uses which format, with which files and flags, is the benchmark's spec
(``eval/benchmarks.py``). Everything else lives here, once:

- chunking: ``--num-chunks N --chunk-idx i`` takes the i-th of N contiguous slices (upstream's split), so the chunk
  files concatenated in index order are exactly the answers of one run;
- resuming: answers already in ``--answers-file`` are skipped; a last line cut short by a crash is removed first, so
  a killed run restarted with the same command ends with every question answered exactly once. The settings that
  produced the file are in its run record (``llava.eval.run_record``, written before the first answer); a rerun
  with other settings (model, pruning, template, decoding) is refused, naming the differences. Failed answers
  (``error`` lines, see below) are retried by the next run;
- batching: ``--batch-size`` samples per ``generate`` call, left-padded (same greedy answers as batch size 1); the
  language model's prefill runs packed when their lengths differ (``--no-packed-prefill`` turns that off), and
  ``--group-window K`` encodes K batches' images first and forms the batches from requests of similar length;
- writing: one JSON line per answer, written and flushed as soon as its batch is done, with upstream's fields
  (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``) plus ``tokens``, the
  per-sample token statistics;
- bad input (a missing or unreadable image, a corrupt row) stops the run with the question id and the file, unless
  ``--skip-errors``, which writes the answer line with ``text: ""`` and ``error: <message>`` so scorers count it
  wrong instead of dropping it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shortuuid
from PIL import Image
from tqdm import tqdm

from eval.common import append_jsonl, iter_jsonl, run_record_path, split_unfinished
from llava.eval import prompt_styles, run_record
from llava.mm_utils import load_image

ImageSource = Path | Callable[[], Image.Image] | None
# Generates answers for a batch: (question texts, images) -> (answer text, token statistics) per sample.
GenerateFn = Callable[[list["Sample"], list[Image.Image | None]], list[tuple[str, dict[str, Any]]]]


class RunnerInputError(ValueError):
    """Bad benchmark input or a bad answers file; the message names the question id and the file."""


@dataclass
class Sample:
    """One generation request. ``text`` is the user turn before the template (the runner places ``<image>``)."""

    question_id: Any
    text: str
    source: str  # the question file (and row), for error messages
    image: ImageSource = None
    fields: dict[str, Any] = field(default_factory=dict)  # answer-line fields besides text / ids / tokens
    error: str | None = None  # a row that could not be parsed: raised (or recorded) when its turn comes

    @property
    def round_id(self) -> Any:
        return self.fields.get("round_id")

    @property
    def key(self) -> AnswerKey:
        """What identifies an answer for resuming: the id (as text), the MMBench round and the prompt (MME asks two
        questions under one image id)."""
        return answer_key({"question_id": self.question_id, **self.fields})


@dataclass(frozen=True)
class QuestionFormat:
    """A question format: a reader, its own flags and upstream's defaults for its runner. ``name`` is the runner
    module's (``python -m llava.eval.<name>``) and the run record's ``benchmark`` field, as before benchmarks had
    specs of their own."""

    name: str
    read: Callable[[argparse.Namespace], list[Sample]]
    temperature: float = 0.2
    max_new_tokens: int = 128
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    plain_mmtag: bool = False  # upstream's loader and MMBench runner switch 'plain' models to the _mmtag template


AnswerKey = tuple[str, str, str]


def answer_key(row: dict[str, Any]) -> AnswerKey:
    round_id, prompt = row.get("round_id"), row.get("prompt")
    return (
        str(row.get("question_id")),
        "" if round_id is None else str(round_id),
        prompt if isinstance(prompt, str) else "",
    )


# ---- command line ---------------------------------------------------------------------------------------------


def build_parser(question_format: QuestionFormat, description: str | None = None) -> argparse.ArgumentParser:
    """Upstream's runner flags (underscore spellings kept, dashed ones accepted), plus chunk/batch/resume/pruning."""
    from llava.utils import add_model_args
    from pruning import add_pruning_args

    parser = argparse.ArgumentParser(
        prog=f"python -m llava.eval.{question_format.name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    parser.add_argument("--question-file", type=str, required=True)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--conv-mode", type=str, default=None, help="default: chosen from the checkpoint")
    parser.add_argument(
        "--prompt-style",
        default=prompt_styles.DEFAULT,
        choices=prompt_styles.names(),
        help="question wording of another model's official evaluation (llava/eval/prompt_styles.py)",
    )
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many slices")
    parser.add_argument("--chunk-idx", type=int, default=0, help="which slice this process answers (0-based)")
    parser.add_argument("--temperature", type=float, default=question_format.temperature)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument(
        "--max_new_tokens",
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        default=question_format.max_new_tokens,
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (only matters with --temperature > 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="questions per generate call (left-padded)")
    parser.add_argument(
        "--no-packed-prefill",
        action="store_true",
        help="run the language model's prefill on the left-padded batch instead of packing the samples' real tokens "
        "(packing is the default when a batch's prompts differ in length; same greedy answers)",
    )
    parser.add_argument(
        "--group-window",
        type=int,
        default=1,
        help="encode the images of this many batches at once, then answer them --batch-size at a time, requests of "
        "similar length together (1: batches in question order); answers are written in question order",
    )
    parser.add_argument(
        "--skip-errors",
        action="store_true",
        help="record questions whose image cannot be read, or whose row lacks a field (no text, a bad image name, an "
        "undecodable MMBench image), as failed answers (scored wrong, retried by the next run) instead of stopping; a "
        "line that is not JSON at all still stops the run, naming its line and column: it has no question id to record",
    )
    parser.add_argument("--overwrite", action="store_true", help="start the answers file afresh instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if question_format.add_args is not None:
        question_format.add_args(parser)
    add_pruning_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.num_chunks < 1:
        raise RunnerInputError(f"--num-chunks must be >= 1, got {args.num_chunks}")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise RunnerInputError(f"--chunk-idx must be in [0, {args.num_chunks - 1}], got {args.chunk_idx}")
    if args.batch_size < 1:
        raise RunnerInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.group_window < 1:
        raise RunnerInputError(f"--group-window must be >= 1, got {args.group_window}")
    if args.max_new_tokens < 1:
        raise RunnerInputError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not Path(args.question_file).is_file():
        raise RunnerInputError(f"--question-file not found: {args.question_file}")


# ---- chunking and resuming ------------------------------------------------------------------------------------


def get_chunk(items: Sequence[Any], num_chunks: int, chunk_idx: int) -> list[Any]:
    """The chunk_idx-th of num_chunks contiguous slices of ceil(len/num_chunks) items (upstream's split_list)."""
    size = math.ceil(len(items) / num_chunks) if items else 0
    return list(items[chunk_idx * size : (chunk_idx + 1) * size])


def read_answered(path: Path, count_failed: bool = False) -> Counter:
    """How many answers the file already holds per key, after cutting off a last line left unfinished by a crash.

    Failed answers (lines with ``error``, written under ``--skip-errors``) do not count unless ``count_failed``:
    the next run retries them. Lines are written whole and newline-terminated, so only the last line can be cut
    short; a bad line anywhere else means the file is not ours (or was edited) and is an error, never skipped.
    """
    done: Counter = Counter()
    if not path.exists():
        return done
    finished, unfinished = split_unfinished(path.read_bytes())
    if unfinished:
        print(
            f"{path}: removing an unfinished last line ({len(unfinished)} bytes) left by an interrupted run",
            file=sys.stderr,
        )
        with path.open("r+b") as handle:
            handle.truncate(len(finished))
    hint = (
        "; only the last line of an answers file can be cut short by a crash, so this file was edited or is not an "
        "answers file: fix it, delete it, or pass --overwrite"
    )
    for number, row in iter_jsonl(path, finished.decode("utf-8"), error=RunnerInputError, hint=hint):
        if not isinstance(row, dict) or "question_id" not in row:
            raise RunnerInputError(f"{path}:{number}: not an answer line (no question_id)")
        if count_failed or row.get("error") is None:
            done[answer_key(row)] += 1
    return done


def drop_failed_answers(path: Path) -> int:
    """Remove the failed answer lines (to be retried) from ``path``; the file is replaced whole, never truncated
    in place, so an interruption leaves either the old or the new file. Returns how many lines were removed."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    failed = {
        number
        for number, row in iter_jsonl(path, text, error=RunnerInputError)
        if isinstance(row, dict) and row.get("error") is not None
    }
    if failed:
        kept = [line for number, line in enumerate(text.split("\n"), 1) if number not in failed]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(failed)


def pending_samples(samples: Sequence[Sample], done: Counter, answers_file: Path) -> list[Sample]:
    """The samples still to answer. Repeated ids (MME asks two questions per image id) are matched in order."""
    seen: Counter = Counter()
    pending = []
    for sample in samples:
        key = sample.key
        if seen[key] < done[key]:
            seen[key] += 1
        else:
            pending.append(sample)
    extra = done - seen
    if extra:
        example = ", ".join(f"{qid!r}" + (f" round {rnd}" if rnd else "") for qid, rnd, _ in list(extra)[:5])
        raise RunnerInputError(
            f"{answers_file} holds {sum(extra.values())} answer(s) to questions that are not in this chunk of the "
            f"question file (e.g. question_id {example}): it belongs to another question file or chunking; "
            "use another --answers-file or pass --overwrite"
        )
    return pending


def check_images_exist(samples: Sequence[Sample]) -> None:
    """Fail before the model loads, not hours into a run, when image files are missing."""
    questions: dict[Path, list[Any]] = {}
    for sample in samples:
        if isinstance(sample.image, Path) and not sample.image.is_file():
            questions.setdefault(sample.image, []).append(sample.question_id)
    if questions:
        shown = "; ".join(f"{path} (question_id {ids[0]!r})" for path, ids in list(questions.items())[:5])
        more = f" (+{len(questions) - 5} more)" if len(questions) > 5 else ""
        asked = sum(len(ids) for ids in questions.values())
        raise RunnerInputError(
            f"{len(questions)} image file(s) not found, asked about by {asked} question(s), e.g. {shown}{more}; "
            "check --image-folder, or pass --skip-errors to record them as failed answers"
        )


# ---- the loop -------------------------------------------------------------------------------------------------


def load_sample_image(sample: Sample) -> Image.Image | None:
    """The sample's image; any problem with it (or with its row) becomes a RunnerInputError naming id and file."""
    if sample.error is not None:
        raise RunnerInputError(f"question_id {sample.question_id!r} ({sample.source}): {sample.error}")
    if sample.image is None:
        return None
    try:
        return load_image(sample.image) if isinstance(sample.image, Path) else sample.image()
    except (OSError, ValueError) as err:
        raise RunnerInputError(f"question_id {sample.question_id!r} ({sample.source}): {err}") from err


def answer_line(sample: Sample, text: str, tokens: dict[str, Any], model_id: str, error: str | None = None) -> dict:
    row = {"question_id": sample.question_id, **sample.fields, "text": text}
    row.update({"answer_id": shortuuid.uuid(), "model_id": model_id, "metadata": {}, "tokens": tokens})
    if error is not None:
        row["error"] = error
    return row


def run(
    samples: Sequence[Sample],
    answers_file: str | Path,
    generate: GenerateFn,
    model_id: str,
    batch_size: int = 1,
    skip_errors: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "answering",
    record: dict[str, Any] | None = None,
) -> int:
    """Answer every sample not yet in ``answers_file`` (failed answers are retried); returns how many lines were
    written. With ``record`` (``llava.eval.run_record.build_record``), an answers file written under other settings
    is refused and the record is written next to the answers before the first one."""
    answers_file = Path(answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        answers_file.unlink(missing_ok=True)
        run_record_path(answers_file).unlink(missing_ok=True)
    if record is not None:
        save_record(answers_file, record)
    retried = drop_failed_answers(answers_file)
    if retried:
        print(f"{answers_file}: retrying {retried} failed answer(s)", file=sys.stderr)
    pending = pending_samples(samples, read_answered(answers_file), answers_file)
    written = 0
    bar = tqdm(
        total=len(samples),
        initial=len(samples) - len(pending),
        desc=desc,
        unit="q",
        disable=not progress or None,
        dynamic_ncols=True,
    )
    generated_tokens, start = 0, time.perf_counter()
    with answers_file.open("a", encoding="utf-8") as out, bar:
        for begin in range(0, len(pending), batch_size):
            batch = pending[begin : begin + batch_size]
            images: list[Image.Image | None] = []
            errors: list[str | None] = []
            for sample in batch:
                try:
                    images.append(load_sample_image(sample))
                    errors.append(None)
                except RunnerInputError as err:
                    if not skip_errors:
                        raise
                    images.append(None)
                    errors.append(str(err))
            good = [i for i, error in enumerate(errors) if error is None]
            results = generate([batch[i] for i in good], [images[i] for i in good]) if good else []
            by_index = dict(zip(good, results, strict=True))
            for index, sample in enumerate(batch):
                if errors[index] is not None:
                    row = answer_line(sample, "", {}, model_id, error=errors[index])
                else:
                    text, tokens = by_index[index]
                    generated_tokens += int(tokens.get("generated", 0) or 0)
                    row = answer_line(sample, text, tokens, model_id)
                append_jsonl(out, row)
                written += 1
            bar.update(len(batch))
            bar.set_postfix_str(f"{generated_tokens / max(time.perf_counter() - start, 1e-9):.1f} gen tok/s")
    return written


def check_record(answers_file: Path, record: dict[str, Any]) -> None:
    """Refuse (RunnerInputError) to resume an answers file written under other settings."""
    if any(read_answered(answers_file, count_failed=True).values()):
        try:
            run_record.check_resume(answers_file, record)
        except run_record.RunRecordError as err:
            raise RunnerInputError(str(err)) from None


def save_record(answers_file: Path, record: dict[str, Any]) -> None:
    """Check the record against the file's, then write it; a resume under a new code version is noted in it."""
    check_record(answers_file, record)
    path = run_record_path(answers_file)
    old = run_record.read_record(path) if any(read_answered(answers_file, count_failed=True).values()) else None
    if old is not None:
        versions = old.get("resumed_with", [old.get("code_version")])
        if record["code_version"] not in versions:
            print(
                f"{answers_file}: resuming answers written by code version {versions[-1]} with "
                f"{record['code_version']} (recorded in {path.name})",
                file=sys.stderr,
            )
            versions = [*versions, record["code_version"]]
        record = {**old, "resumed_with": versions} if len(versions) > 1 else old
    run_record.write_record(path, record)


# ---- model side -----------------------------------------------------------------------------------------------


def resolve_conv_mode(args: argparse.Namespace, question_format: QuestionFormat, model_name: str, model_config) -> str:
    """--conv-mode, else the template upstream evaluated this family with (``llava.utils.default_conv_mode``)."""
    from llava.utils import default_conv_mode

    conv_mode = args.conv_mode or default_conv_mode(model_name, model_config, purpose="eval")
    if question_format.plain_mmtag and "plain" in model_name and "finetune" not in model_name.lower():
        if "mmtag" not in conv_mode:
            conv_mode += "_mmtag"
    return conv_mode


def format_options(question_format: QuestionFormat, args: argparse.Namespace) -> dict[str, Any]:
    """The values of the format's own flags (e.g. ScienceQA's --single-pred-prompt), for the run record."""
    if question_format.add_args is None:
        return {}
    own = argparse.ArgumentParser(add_help=False)
    question_format.add_args(own)
    return {action.dest: getattr(args, action.dest) for action in own._actions}


def _style_option(args: argparse.Namespace) -> dict[str, Any]:
    """--prompt-style for the run record, only when set (records of LLaVA's own wording stay as they were)."""
    style = getattr(args, "prompt_style", prompt_styles.DEFAULT)
    return {} if style == prompt_styles.DEFAULT else {"prompt_style": style}


def build_run_record(args: argparse.Namespace, question_format: QuestionFormat) -> tuple[dict[str, Any], str]:
    """(this run's record, conv mode), from the checkpoint's config.json alone: checked before the model loads."""
    from types import SimpleNamespace

    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import CheckpointError
    from llava.utils import checkpoint_config, resolved_tower
    from pruning import PruningConfigError, pruning_overrides, resolve_pruning

    try:
        config = checkpoint_config(args.model_path)
        pruning = resolve_pruning(config.get("pruning"), pruning_overrides(args)).to_dict()
    except (CheckpointError, PruningConfigError) as err:
        raise RunnerInputError(str(err)) from None
    model_name = get_model_name_from_path(args.model_path)
    conv_mode = resolve_conv_mode(args, question_format, model_name, SimpleNamespace(**config))
    tower = args.vision_tower or resolved_tower(config, args.model_path)
    record = run_record.build_record(
        benchmark=question_format.name,
        model_path=args.model_path,
        model_base=args.model_base,
        vision_tower=tower,
        conv_mode=conv_mode,
        generation=generation_settings(args),
        pruning=pruning,
        options={**format_options(question_format, args), **_style_option(args)},
        question_file=args.question_file,
        batch_size=args.batch_size,
    )
    return record, conv_mode


def model_generate_fn(conv_mode: str, tokenizer, model, image_processor, **generation: Any) -> GenerateFn:
    """The runner's view of a loaded model; ``generation`` holds generate_answers' decoding settings."""
    from llava.inference import build_prompt, generate_answers

    def generate(batch: list[Sample], images: list[Image.Image | None]) -> list[tuple[str, dict[str, Any]]]:
        prompts = [
            build_prompt(s.text, conv_mode, num_images=int(image is not None), model_config=model.config)
            for s, image in zip(batch, images)
        ]
        answers = generate_answers(model, tokenizer, image_processor, prompts, images, **generation)
        return [(answer.text, answer.token_stats) for answer in answers]

    return generate


def serving_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How requests are batched (packing, grouping by length): not in the run record, the greedy answers are the
    same either way."""
    return {
        "packed_prefill": False if args.no_packed_prefill else None,
        "group_size": args.batch_size if args.group_window > 1 else None,
    }


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }


def main(question_format: QuestionFormat, argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse the flags, read and chunk the questions, check the run record, load the model only if something is
    left to answer, run. Bad input or settings that differ from the answers file's end with exit status 2."""
    from llava.mm_utils import get_model_name_from_path
    from llava.utils import check_before_loading, exit_with_user_error, load_from_args, quiet_transformers, user_errors
    from pruning import pruning_overrides

    args = build_parser(question_format, description).parse_args(argv)
    try:
        check_args(args)
        questions = prompt_styles.restyle(args.prompt_style, question_format.name, question_format.read(args))
        samples = get_chunk(questions, args.num_chunks, args.chunk_idx)
        if not samples:
            raise RunnerInputError(f"--question-file {args.question_file} holds no questions")
        answers_file = Path(args.answers_file)
        if args.overwrite:
            answers_file.unlink(missing_ok=True)
            run_record_path(answers_file).unlink(missing_ok=True)
        record, conv_mode = build_run_record(args, question_format)
        check_record(answers_file, record)
        pending = pending_samples(samples, read_answered(answers_file), answers_file)
        if not args.skip_errors:
            check_images_exist(pending)
        check_before_loading(args, pruning_overrides(args))  # e.g. --visual-layer beyond the tower
    except (RunnerInputError, prompt_styles.PromptStyleError, *user_errors()) as err:
        exit_with_user_error(err)
    desc = f"{question_format.name} chunk {args.chunk_idx + 1}/{args.num_chunks}"
    if not pending:
        save_record(answers_file, record)
        print(f"{desc}: all {len(samples)} questions already answered in {answers_file}", file=sys.stderr)
        return 0
    quiet_transformers()
    tokenizer, model, image_processor, _ = load_from_args(args, pruning_overrides(args))
    if model.pruning_config.to_dict() != record["pruning"]:
        raise RuntimeError(f"the loaded model's pruning config {model.pruning_config} differs from the run record's")
    print(
        f"{desc}: {len(pending)} of {len(samples)} questions to answer; conv mode {conv_mode}; "
        f"pruning: {model.pruning_config.describe()}",
        file=sys.stderr,
    )
    settings = {**generation_settings(args), **serving_settings(args)}
    generate = model_generate_fn(conv_mode, tokenizer, model, image_processor, **settings)
    try:
        return run(
            samples,
            answers_file,
            generate,
            get_model_name_from_path(args.model_path),
            batch_size=args.batch_size * args.group_window,  # one generate call per window
            skip_errors=args.skip_errors,
            progress=not args.no_progress,
            desc=desc,
            record=record,
        )
    except (RunnerInputError, *user_errors()) as err:  # e.g. a budget above the tower's patch count
        exit_with_user_error(err)
