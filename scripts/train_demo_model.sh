#!/usr/bin/env bash
# Train the demo LLaVA-1.5 checkpoint from scratch on the synthetic shapes data, on a CPU (2 cores: about 28 minutes).
#
#   bash scripts/train_demo_model.sh                       # writes playground/checkpoints/llava-v1.5-demo(-clip)
#   OUT=checkpoints/my-demo WORK=output/my-run bash scripts/train_demo_model.sh
#
# Steps (docs/demo.md): 1. generate the training split (seed 0); 2. a random LLaVA-1.5 checkpoint in the release
# layout with a sentencepiece tokenizer trained on the questions; 3. pre-train the tiny CLIP tower (which objects
# are present, from the last-layer CLS; which object each patch and each object shows, from layer -2); 4. start the
# projector as the tower's patch classifier followed by each category's word embeddings; 5. keep the POPE and
# short-answer VQA records; 6. llava/train/train.py, full training with the tower unfrozen, stage 1 in the loop,
# then a short unpruned phase; 7. the release layout (tuned tower inside, as LLaVA-1.6 ships it).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-playground/checkpoints/llava-v1.5-demo}
TOWER=${TOWER:-${OUT}-clip}
WORK=${WORK:-output/demo-train}
SEED=${SEED:-0}
TRAIN_IMAGES=${TRAIN_IMAGES:-2400}
TOWER_STEPS=${TOWER_STEPS:-1000}
PHASE1_STEPS=${PHASE1_STEPS:-1300}
PHASE2_STEPS=${PHASE2_STEPS:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

rm -rf "$WORK" && mkdir -p "$WORK"
python -m eval.synthetic --out "$WORK/data" --split train --num-images "$TRAIN_IMAGES" --seed "$SEED"
python scripts/train_demo_model.py init --data "$WORK/data" --out "$WORK/init" --tower-out "$WORK/clip" --seed "$SEED"
python scripts/train_demo_model.py pretrain-tower --data "$WORK/data" --tower "$WORK/clip" --steps "$TOWER_STEPS" \
    --head-out "$WORK/patch_head.pt" --seed "$SEED"
python scripts/train_demo_model.py init-projector --model "$WORK/init" --head "$WORK/patch_head.pt"
# the LLM trains on the POPE and short-answer VQA records: the VQA answers name an attribute of the asked object,
# the first-order path that lets a Llama from scratch learn to find objects before POPE's yes/no (docs/demo.md);
# one multi-turn record per image, so each pass of the tower serves all of the image's questions
python scripts/train_demo_model.py select-records --data "$WORK/data" --kinds pope,vqa --per-image \
    --out "$WORK/data/train_pope_vqa.json"
COMMON=(--version v1 --data_path "$WORK/data/train_pope_vqa.json" --image_folder "$WORK/data/images" --image_aspect_ratio pad
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --unfreeze_mm_vision_tower True
    --mm_vision_tower_lr 2e-4 --lora_enable False --weight_decay 0.0
    --warmup_ratio 0.03 --lr_scheduler_type cosine --model_max_length 2048 --logging_steps 50 --save_strategy no
    --report_to none --use_cpu True --seed "$SEED" --data_seed "$SEED" --dataloader_num_workers 0
    --disable_tqdm True --visual-layer 3 --lazy_preprocess False)
# phase 1: stage-1 pruning in the loop (as the paper fine-tunes), scored at the tower's last layer (whose CLS was
# trained to find the objects): the answers are looked for among the ~15 % of patches the CLS ranks first
python -m llava.train.train --model_name_or_path "$WORK/init" --vision_tower "$WORK/clip" \
    --output_dir "$WORK/phase1" --max_steps "$PHASE1_STEPS" --per_device_train_batch_size 16 --learning_rate 1e-3 \
    --visual-pruning longtail "${COMMON[@]}"
# phase 2: no pruning, so the model also answers from all 576 patches (the unpruned baseline of the table); train.py
# takes phase 1's tuned tower from the checkpoint (its config says unfreeze_mm_vision_tower)
python -m llava.train.train --model_name_or_path "$WORK/phase1" --vision_tower "$WORK/clip" \
    --output_dir "$WORK/llava" --max_steps "$PHASE2_STEPS" --per_device_train_batch_size 4 --learning_rate 5e-4 \
    --visual-pruning none "${COMMON[@]}"
# the tower folder keeps the pre-trained tower; the tuned one lives in the checkpoint (LLaVA-1.6's convention)
mkdir -p "$(dirname "$TOWER")"
rm -rf "$TOWER" && cp -r "$WORK/clip" "$TOWER"
python scripts/train_demo_model.py finalize --trained "$WORK/llava" --out "$OUT" --tower "$TOWER" --tower-name "$TOWER"
echo "done: $OUT (tower folder $TOWER)"
