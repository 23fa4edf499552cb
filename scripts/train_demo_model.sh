#!/usr/bin/env bash
# Train the demo LLaVA-1.5 checkpoint from scratch on the synthetic shapes data, on a CPU (2 cores: about 25 minutes).
#
#   bash scripts/train_demo_model.sh                       # writes playground/checkpoints/llava-v1.5-demo(-clip)
#   OUT=checkpoints/my-demo WORK=output/my-run bash scripts/train_demo_model.sh
#
# Steps (docs/demo.md): 1. generate the training split (seed 0); 2. a random LLaVA-1.5 checkpoint in the release
# layout with a sentencepiece tokenizer trained on the questions; 3. pre-train the tiny CLIP tower as a
# multi-label classifier on its last-layer CLS (why: scripts/train_demo_model.py); 4. full training (no LoRA, tower
# unfrozen) with llava/train/train.py; 5. write the release layout (tuned tower inside, as LLaVA-1.6 ships it).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-playground/checkpoints/llava-v1.5-demo}
TOWER=${TOWER:-${OUT}-clip}
WORK=${WORK:-output/demo-train}
SEED=${SEED:-0}
TRAIN_IMAGES=${TRAIN_IMAGES:-2400}
TOWER_STEPS=${TOWER_STEPS:-300}
EPOCHS=${EPOCHS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

rm -rf "$WORK" && mkdir -p "$WORK"
python -m eval.synthetic --out "$WORK/data" --split train --num-images "$TRAIN_IMAGES" --seed "$SEED"
python scripts/train_demo_model.py init --data "$WORK/data" --out "$WORK/init" --tower-out "$WORK/clip" --seed "$SEED"
python scripts/train_demo_model.py pretrain-tower --data "$WORK/data" --tower "$WORK/clip" --steps "$TOWER_STEPS" \
    --seed "$SEED"
python scripts/train_demo_model.py llava \
    --model_name_or_path "$WORK/init" --vision_tower "$WORK/clip" --version v1 \
    --data_path "$WORK/data/train.json" --image_folder "$WORK/data/images" --image_aspect_ratio pad \
    --output_dir "$WORK/llava" --lora_enable False --num_train_epochs "$EPOCHS" --per_device_train_batch_size 4 \
    --learning_rate 1e-3 --weight_decay 0.0 --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --model_max_length 2048 --logging_steps 20 --save_strategy no --report_to none --use_cpu True \
    --seed "$SEED" --data_seed "$SEED" --dataloader_num_workers 0 --disable_tqdm True
mkdir -p "$(dirname "$TOWER")"
rm -rf "$TOWER" && cp -r "$WORK/clip" "$TOWER"
python scripts/train_demo_model.py finalize --trained "$WORK/llava" --out "$OUT" --tower "$TOWER" --tower-name "$TOWER"
echo "done: $OUT (tower folder $TOWER)"
