"""Chat about an image in the terminal:

    python -m llava.serve.cli --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg

Type a message and press enter; an empty line or end of input (Ctrl-D) ends the session. The image is attached to
the first turn, as upstream. Each reply is followed by its token counts when --show-tokens is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from llava.conversation import conv_templates
from llava.inference import generate_answers, image_token_text
from llava.mm_utils import get_model_name_from_path, load_image
from llava.utils import (
    add_model_args,
    check_before_loading,
    default_conv_mode,
    load_from_args,
    quiet_transformers,
    run_entry_point,
)
from pruning import add_pruning_args, pruning_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image-file", type=str, default=None)
    parser.add_argument("--conv-mode", type=str, default=None)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--show-tokens", action="store_true")
    add_pruning_args(parser)
    return parser.parse_args(argv)


def chat(args: argparse.Namespace, stdin=sys.stdin, stdout=sys.stdout) -> list[str]:
    image = load_image(args.image_file) if args.image_file else None
    if args.conv_mode is not None and args.conv_mode not in conv_templates:
        raise SystemExit(f"error: unknown --conv-mode {args.conv_mode!r}; choose one of {', '.join(conv_templates)}")
    check_before_loading(args, pruning_overrides(args))  # bad settings fail here, not after the model loaded
    quiet_transformers()
    tokenizer, model, image_processor, _ = load_from_args(args, pruning_overrides(args))
    conv_mode = args.conv_mode or default_conv_mode(get_model_name_from_path(args.model_path), model.config)
    conv = conv_templates[conv_mode].copy()
    replies: list[str] = []
    first = True
    while True:
        stdout.write(f"{conv.roles[0]}: ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            stdout.write("\n")
            break
        text = line.strip()
        if first and image is not None:
            text = image_token_text(model.config) + "\n" + text
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        answer = generate_answers(
            model,
            tokenizer,
            image_processor,
            [conv.get_prompt()],
            [image if image is not None else None],
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
        )[0]
        conv.messages[-1][-1] = answer.text
        stdout.write(f"{conv.roles[1]}: {answer.text}\n")
        if args.show_tokens:
            stdout.write(json.dumps(answer.token_stats) + "\n")
        replies.append(answer.text)
        first = False
    return replies


def main(argv: list[str] | None = None) -> list[str]:
    """Bad input ends with one ``error:`` line and exit status 2, checked before the model loads."""
    return run_entry_point(lambda args: chat(parse_args(args)), argv)


if __name__ == "__main__":
    main()
