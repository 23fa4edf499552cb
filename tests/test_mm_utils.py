"""Image helpers and stopping criteria of llava.mm_utils."""

import base64
import io
import json

import pytest
import torch
from PIL import Image
from transformers import StoppingCriteriaList

from llava.mm_utils import (
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image,
    load_image_from_base64,
    load_image_processor,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
)
from llava.tokenization import load_tokenizer, train_sentencepiece
from tests.helpers import CLIP_MEAN, CLIP_STD

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The processor the vision tower gets, loaded like openai/clip-vit-large-patch14-336's (old int sizes)."""
    folder = tmp_path_factory.mktemp("clip")
    config = {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": 336,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return load_image_processor(folder)


def two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(Image.new("RGB", (width - width // 2, height), BLUE), (width // 2, 0))
    return image


def normalized(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_expand2square_pads_short_side_centred():
    wide = expand2square(Image.new("RGB", (40, 20), RED), (1, 2, 3))
    assert wide.size == (40, 40)
    assert wide.getpixel((0, 0)) == (1, 2, 3) and wide.getpixel((39, 39)) == (1, 2, 3)
    assert wide.getpixel((0, 10)) == RED and wide.getpixel((20, 20)) == RED and wide.getpixel((20, 9)) == (1, 2, 3)
    tall = expand2square(Image.new("RGB", (10, 30), BLUE), (9, 9, 9))
    assert tall.size == (30, 30) and tall.getpixel((10, 0)) == BLUE and tall.getpixel((9, 0)) == (9, 9, 9)
    square = Image.new("RGB", (8, 8), RED)
    assert expand2square(square, (0, 0, 0)) is square


def test_process_images_pad_uses_processor_mean_colour(processor):
    images = [Image.new("RGB", (500, 250), RED), Image.new("RGB", (200, 400), BLUE)]
    pixels = process_images(images, processor, {"image_aspect_ratio": "pad"})
    assert pixels.shape == (2, 3, 336, 336) and pixels.dtype == torch.float32
    padding = normalized(tuple(int(x * 255) for x in CLIP_MEAN))
    torch.testing.assert_close(pixels[0, :, 0, 0], padding, atol=1e-4, rtol=0)  # top band is padding
    torch.testing.assert_close(pixels[0, :, 168, 168], normalized(RED), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[1, :, 168, 0], padding, atol=1e-4, rtol=0)  # left band of the tall one


def test_process_images_default_is_resize_and_center_crop(processor):
    class Config:  # attribute-style model config, no image_aspect_ratio
        pass

    pixels = process_images([two_colour(600, 300)], processor, Config())
    assert pixels.shape == (1, 3, 336, 336) and pixels.dtype == torch.float32
    # Resized to 672x336 then center-cropped: the crop spans the red/blue boundary, no padding anywhere.
    torch.testing.assert_close(pixels[0, :, 0, 0], normalized(RED), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[0, :, 0, 335], normalized(BLUE), atol=1e-4, rtol=0)


def test_select_best_resolution_prefers_effective_then_least_waste():
    assert select_best_resolution((1000, 500), PINPOINTS) == (672, 336)  # 1008x336 keeps as much but wastes more
    assert select_best_resolution((300, 600), PINPOINTS) == (336, 672)
    assert select_best_resolution((2000, 2000), PINPOINTS) == (672, 672)
    # A small image fits every pinpoint fully: least waste wins, and of equal waste the first listed.
    assert select_best_resolution((100, 100), PINPOINTS) == (336, 672)
    assert select_best_resolution((100, 100), [[672, 336], [336, 672]]) == (672, 336)


def test_resize_and_pad_image_centres_on_black():
    padded = resize_and_pad_image(Image.new("RGB", (1000, 400), RED), (672, 336))
    assert padded.size == (672, 336)
    # scaled to 672x269, pasted at y = (336 - 269) // 2 = 33
    assert padded.getpixel((300, 32)) == (0, 0, 0) and padded.getpixel((300, 33)) == RED
    assert padded.getpixel((300, 301)) == RED and padded.getpixel((300, 302)) == (0, 0, 0)


def test_divide_to_patches_row_major():
    patches = divide_to_patches(two_colour(8, 8).resize((8, 8)), 4)
    assert len(patches) == 4 and all(p.size == (4, 4) for p in patches)
    assert [p.getpixel((0, 0)) for p in patches] == [RED, BLUE, RED, BLUE]


def test_grid_shape_accepts_list_or_string():
    assert get_anyres_image_grid_shape((1000, 500), PINPOINTS, 336) == (2, 1)
    assert get_anyres_image_grid_shape((300, 600), str(PINPOINTS), 336) == (1, 2)
    assert get_anyres_image_grid_shape((2000, 1900), PINPOINTS, 336) == (2, 2)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        get_anyres_image_grid_shape((10, 10), "[336, 672]", 336)


def test_process_anyres_image_crop_count_and_order(processor):
    crops = process_anyres_image(two_colour(1000, 500), processor, PINPOINTS)
    assert crops.shape == (3, 3, 336, 336) and crops.dtype == torch.float32  # overview + 2x1 grid
    torch.testing.assert_close(crops[1, :, 168, 168], normalized(RED), atol=1e-4, rtol=0)
    torch.testing.assert_close(crops[2, :, 168, 168], normalized(BLUE), atol=1e-4, rtol=0)
    square = process_anyres_image(Image.new("RGB", (2000, 1900), RED), processor, str(PINPOINTS))
    assert square.shape == (5, 3, 336, 336)


def test_process_images_anyres_keeps_list_when_grids_differ(processor):
    cfg = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": str(PINPOINTS)}
    out = process_images([Image.new("RGB", (1000, 500)), Image.new("RGB", (2000, 1900))], processor, cfg)
    assert isinstance(out, list) and [t.shape[0] for t in out] == [3, 5]
    same = process_images([Image.new("RGB", (1000, 500)), Image.new("RGB", (900, 450))], processor, cfg)
    assert same.shape == (2, 3, 3, 336, 336)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        process_images([Image.new("RGB", (10, 10))], processor, {"image_aspect_ratio": "anyres"})


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (5, 3), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (77, 77, 77)
    assert load_image(str(path)).size == (5, 3)


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    two_colour(64, 64).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ValueError, match="local files only"):
        load_image("https://example.com/cat.jpg")


def test_load_image_from_base64(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 2), (1, 2, 3, 4)).save(buffer, format="PNG")
    image = load_image_from_base64(base64.b64encode(buffer.getvalue()).decode())
    assert image.mode == "RGB" and image.size == (4, 2) and image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="base64"):
        load_image_from_base64("not base64 !!")
    with pytest.raises(ValueError, match="readable image"):
        load_image_from_base64(base64.b64encode(b"nope").decode())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"USER: what is {w}? ASSISTANT: a {w} ### done" for w in "cat dog red blue table chair".split()] * 20
    return load_tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=400))


def test_keywords_stopping_is_per_sample(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    rows = [ids("a cat") + [tokenizer.eos_token_id], ids("a dog ###"), ids("a red table")]
    width = max(map(len, rows))
    pad = tokenizer.unk_token_id
    batch = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    criteria = KeywordsStoppingCriteria(["</s>", "###"], tokenizer)
    done = criteria(batch, None)
    assert done.dtype == torch.bool and done.tolist() == [True, True, False]
    assert StoppingCriteriaList([criteria])(batch, None).tolist() == [True, True, False]


def test_keywords_stopping_ignores_the_prompt(tokenizer):
    prompt = torch.tensor([tokenizer("USER: what is ###").input_ids])
    assert KeywordsStoppingCriteria(["###"], tokenizer)(prompt, None).tolist() == [True]
    criteria = KeywordsStoppingCriteria(["###"], tokenizer, prompt)
    assert criteria(prompt, None).tolist() == [False]
    more = torch.cat([prompt, torch.tensor([tokenizer("a cat", add_special_tokens=False).input_ids])], dim=1)
    assert criteria(more, None).tolist() == [False]
    stop = torch.cat([more, torch.tensor([tokenizer(" ###", add_special_tokens=False).input_ids])], dim=1)
    assert criteria(stop, None).tolist() == [True]


def test_keywords_stopping_matches_decoded_text(tokenizer):
    """The keyword's own ids need not appear: "cat###" splits differently from "###" but decodes to it."""
    generated = tokenizer("cat###", add_special_tokens=False).input_ids
    keyword_ids = tokenizer("###", add_special_tokens=False).input_ids
    assert generated[-len(keyword_ids) :] != keyword_ids
    criteria = KeywordsStoppingCriteria(["###"], tokenizer)
    assert criteria(torch.tensor([generated]), None).tolist() == [True]
    with pytest.raises(ValueError, match="keyword"):
        KeywordsStoppingCriteria([], tokenizer)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("./checkpoints/llava-v1.5-7b-lora/", "llava-v1.5-7b-lora"),
        ("/ckpt/llava-lora-run/checkpoint-500", "llava-lora-run_checkpoint-500"),
        ("/ckpt/llava-lora-run/checkpoint-500/", "llava-lora-run_checkpoint-500"),
        ("checkpoint-5", "checkpoint-5"),
        ("llava", "llava"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_get_model_name_from_empty_path():
    with pytest.raises(ValueError, match="model name"):
        get_model_name_from_path("/")
