"""Question text as each model's official evaluation code writes it (``--prompt-style``), from LLaVA's files.

Every benchmark folder holds LLaVA's question files, whose ``text`` is the question in LLaVA's words (e.g. the
instruction after a newline). Other models were evaluated by their authors with other wordings; a prompt style
rewrites ``text`` (what the model is asked) into that wording, per runner. The answers' ``prompt`` field keeps the
question file's text, which the scorers read to pair answers with questions; the run record names the style.
``llava`` (the default) changes nothing.

InternVL2 (OpenGVLab/InternVL 2410d1db, ``internvl_chat/eval``), one style per official script:

- ``internvl2_vqa`` (``vqa/evaluate_vqa.py``: TextVQA, VQAv2): ``question + ' ' + instruction``;
- ``internvl2_mme`` (``mme/eval.py``): the MME question, "Please answer yes or no." included, ``+ ' ' +``
  instruction (LLaVA's MME file drops that sentence; it is put back);
- ``internvl2_sqa`` (``scienceqa/evaluate_scienceqa.py``): ``hint\\nquestion\\nA. ...\\nB. ...\\ninstruction``: the
  hint without LLaVA's "Context: " label, and no line at all when there is none (LLaVA writes "Context: N/A");
- ``internvl2_mmvet`` (``mmvet/evaluate_mmvet.py``): ``question + ' '`` (an empty prompt joined by a space);
- ``internvl2_llavabench`` (``llava_bench/evaluate_llava_bench.py``): ``question + ' Please give a detailed answer.'``.

POPE (``pope/evaluate_pope.py`` keeps LLaVA's question with its instruction line) and MMBench
(``mmbench/evaluate_mmbench.py`` builds hint, question, options and instruction exactly as LLaVA's runner) need none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."
LETTER = "Answer with the option's letter from the given choices directly."
DEFAULT = "llava"


class PromptStyleError(ValueError):
    """A question the style cannot rewrite (not in the layout it expects), or a style used with the wrong runner."""


@dataclass(frozen=True)
class PromptStyle:
    """Rewrites a question's text for one runner (``llava/eval/<runner>.py``)."""

    runner: str
    rewrite: Callable[[str], str]
    source: str  # the official script it transcribes


def _vqa(text: str) -> str:
    return _before_instruction(text, SHORT_ANSWER) + " " + SHORT_ANSWER


def _mme(text: str) -> str:
    return _before_instruction(text, SHORT_ANSWER) + " " + YES_NO + " " + SHORT_ANSWER


def _sqa(text: str) -> str:
    """LLaVA's "Context: <hint>\\n<question>\\n<options>[\\n<letter instruction>]" -> the official order."""
    if not text.startswith("Context: "):
        raise PromptStyleError(f"expected LLaVA's ScienceQA text starting with 'Context: ', got {text[:60]!r}")
    body = text[len("Context: ") :]
    if body.startswith("N/A\n"):
        body = body[len("N/A\n") :]
    if not body.endswith("\n" + LETTER):
        body += "\n" + LETTER  # the official script always asks for the letter
    return body.strip()


def _mmvet(text: str) -> str:
    return text + " "


def _llavabench(text: str) -> str:
    return text + " Please give a detailed answer."


def _before_instruction(text: str, instruction: str) -> str:
    if not text.endswith("\n" + instruction):
        raise PromptStyleError(f"expected a question ending with '\\n{instruction}', got {text[-80:]!r}")
    return text[: -len(instruction) - 1]


STYLES: dict[str, PromptStyle] = {
    "internvl2_vqa": PromptStyle("model_vqa_loader", _vqa, "InternVL vqa/evaluate_vqa.py"),
    "internvl2_mme": PromptStyle("model_vqa_loader", _mme, "InternVL mme/eval.py"),
    "internvl2_sqa": PromptStyle("model_vqa_science", _sqa, "InternVL scienceqa/evaluate_scienceqa.py"),
    "internvl2_mmvet": PromptStyle("model_vqa", _mmvet, "InternVL mmvet/evaluate_mmvet.py"),
    "internvl2_llavabench": PromptStyle("model_vqa", _llavabench, "InternVL llava_bench/evaluate_llava_bench.py"),
}


def names() -> tuple[str, ...]:
    return (DEFAULT, *STYLES)


def restyle(style: str, runner: str, samples: Sequence) -> list:
    """The runner's samples with ``text`` rewritten in ``style`` (rows that failed to parse stay as they are)."""
    if style == DEFAULT:
        return list(samples)
    if style not in STYLES:
        raise PromptStyleError(f"unknown --prompt-style {style!r}; choose one of {', '.join(names())}")
    spec = STYLES[style]
    if spec.runner != runner:
        raise PromptStyleError(f"--prompt-style {style} is for llava.eval.{spec.runner}, not llava.eval.{runner}")
    for sample in samples:
        if sample.error is None:
            try:
                sample.text = spec.rewrite(sample.text)
            except PromptStyleError as err:
                sample.error = f"--prompt-style {style}: {err}"
    return list(samples)
