"""Constants shared by the model, the data pipeline and the runners (same values as upstream LLaVA)."""

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
NON_LORA_FILE = "non_lora_trainables.bin"  # LoRA runs: every trained weight outside the adapter

# openai/clip-vit-large-patch14(-336) preprocessing: the normalisation every LLaVA-1.5 / 1.6 tower was trained with
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
