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
PHASE2_STEPS=${PHASE2_STEPS:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

rm -rf "$WORK" && mkdir -p "$WORK"
python -m eval.synthetic --out "$WORK/data" --split train --num-images "$TRAIN_IMAGES" --seed "$SEED"
python scripts/train_demo_model.py init --data "$WORK/data" --out "$WORK/init" --tower-out "$WORK/clip" --seed "$SEED"
python scripts/train_demo_model.py pretrain-tower --data "$WORK/data" --tower "$WORK/clip" --steps "$TOWER_STEPS" \
    --seed "$SEED"
COMMON=(--version v1 --data_path "$WORK/data/train.json" --image_folder "$WORK/data/images" --image_aspect_ratio pad
    --lora_enable False --per_device_train_batch_size 4 --weight_decay 0.0 --warmup_ratio 0.03
    --lr_scheduler_type cosine --model_max_length 2048 --logging_steps 20 --save_strategy no --report_to none
    --use_cpu True --seed "$SEED" --data_seed "$SEED" --dataloader_num_workers 0 --disable_tqdm True)
# phase 1: stage-1 pruning in the loop (as the paper fine-tunes): the LLM sees the ~25 % of patches the CLS ranks
# first, so the answer tokens find the objects among ~150 tokens instead of 576 (docs/demo.md, "Why two phases")
python scripts/train_demo_model.py llava --model_name_or_path "$WORK/init" --vision_tower "$WORK/clip" \
    --output_dir "$WORK/phase1" --num_train_epochs 1 --learning_rate 1e-3 \
    --visual-pruning longtail --visual-layer 2 "${COMMON[@]}"
python scripts/train_demo_model.py export-tower --trained "$WORK/phase1" --tower "$WORK/clip" --out "$WORK/clip1"
# phase 2: no pruning, so the model also answers from all 576 patches (the unpruned baseline of the table)
python scripts/train_demo_model.py llava --model_name_or_path "$WORK/phase1" --vision_tower "$WORK/clip1" \
    --output_dir "$WORK/llava" --max_steps "$PHASE2_STEPS" --learning_rate 5e-4 \
    --visual-pruning none --visual-layer 2 "${COMMON[@]}"
mkdir -p "$(dirname "$TOWER")"
rm -rf "$TOWER" && cp -r "$WORK/clip1" "$TOWER"
python scripts/train_demo_model.py finalize --trained "$WORK/llava" --out "$OUT" --tower "$TOWER" --tower-name "$TOWER"
echo "done: $OUT (tower folder $TOWER)"
