"""Answer one question about one or more images:

python -m llava.eval.run_llava --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg --query "What is this?"
"""

from __future__ import annotations

import argparse
import json

from llava.inference import build_prompt, generate_answers
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
    parser.add_argument("--image-file", type=str, default=None, help="image path(s), separated by --sep")
    parser.add_argument("--query", type=str, required=True)
    parser.add_argument("--conv-mode", type=str, default=None)
    parser.add_argument("--sep", type=str, default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--show-tokens", action="store_true", help="also print the token statistics as JSON")
    add_pruning_args(parser)
    return parser.parse_args(argv)


def eval_model(args: argparse.Namespace) -> str:
    images = [load_image(path) for path in args.image_file.split(args.sep)] if args.image_file else []
    check_before_loading(args, pruning_overrides(args))  # bad settings fail here, not after the model loaded
    quiet_transformers()
    tokenizer, model, image_processor, _ = load_from_args(args, pruning_overrides(args))
    conv_mode = args.conv_mode or default_conv_mode(get_model_name_from_path(args.model_path), model.config)
    prompt = build_prompt(args.query, conv_mode, num_images=len(images), model_config=model.config)
    answer = generate_answers(
        model,
        tokenizer,
        image_processor,
        [prompt],
        [images or None],
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
    )[0]
    print(answer.text)
    if args.show_tokens:
        print(json.dumps(answer.token_stats))
    return answer.text


def main(argv: list[str] | None = None) -> None:
    """Bad input (a missing or unreadable image or model folder, an invalid pruning value) ends with one
    ``error:`` line and exit status 2, checked before the model loads."""
    run_entry_point(lambda args: eval_model(parse_args(args)), argv)


if __name__ == "__main__":
    main()
