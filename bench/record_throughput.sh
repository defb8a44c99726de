#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): bench/train_throughput.py on a full-depth Llama-3.1-8B replica,
# one mode per device call, each sized for one call of <= 10 minutes on the H100 ($OUT brings back <= 6 files):
#   lora        rigplan, bare Unsloth, HF baseline: LoRA, the rtx-4090 plan, one epoch of 224 examples of
#               256-2000 words (~7.5 min)
#   lora-plain  the same plan and data, HF baseline only, computing the loss as a plain transformers + PEFT
#               loop does (full logits, as shared/data's HF rows) instead of TRL 1.15's chunked LM head
#   lora-mb2    as lora at micro-batch 2 (x 8): padding-free batches in every part
#   lora-plain-mb2  lora-plain at micro-batch 2
#   qlora       the three parts, QLoRA, the rtx-4090 plan, 160 examples
#   equal       rigplan and bare on 2001-token examples with the H100's own plan (micro-batch 1, no
#               checkpointing): bench/results/h100-tp2-lora-2001tok.json again, the padding-free fix on its own
#   qlora-mb2   as qlora at micro-batch 2 (x 8)
#   qlora-4090  the rtx-4090's QLoRA plan as today's planner makes it, against the plain HF baseline (hf-plain)
#   profile-4090  rigplan and bare on that plan under cProfile (bench/train_throughput.py --profile)
#   variants-4090  the bare loop and the trainer with each of its costs taken away, on that plan
#   variants-own-lora  the H100's LoRA plan: bare, rigplan, rigplan with in-place gradients, rigplan again
#   own-lora, own-qlora  the local GPU's own plan (as `rigplan run` trains it), against the HF baseline (hf-plain)
#   own-qlora-mb4-padded  own-qlora's data at micro-batch 4 x 4, padded batches in every part
#   pf-sweep    rigplan alone: QLoRA micro-batch 8 padding-free, LoRA 4 padding-free and padded, LoRA 2 padding-free
#   qlora-choice  own-qlora's data, rigplan alone at micro-batch 2 padded, 4 padded and 4 padding-free
#   own-lora-padded, own-qlora-padded  rigplan and bare on that plan with padded micro-batches (--batching padded):
#               Unsloth compiles each decoder block only for padded ones; own-qlora-pf: rigplan alone, padding-free
# e.g. bash bench/record_throughput.sh lora   (or several modes: bash bench/record_throughput.sh lora-plain-mb2 qlora-mb2)
# Sizes: importing Unsloth and loading the 8B replica take 40-55 s per part, its first steps compile for 20-40 s,
# and the estimator predicts ~3,500 tok/s for Unsloth at micro-batch 1 of ~1,100 tokens on the H100 (host-bound).
# Big files (replica, adapters) stay in /tmp; JSON and logs go to $OUT. The JSON is rewritten after every part
# (rigplan, bare, then the slowest, hf), so a timeout keeps the parts that ran.
set -uo pipefail
source bench/gpu_setup.sh
# torch.compile's recompiles show in each part's log: Unsloth compiles every decoder block, and the trainer's
# path marks batch dims static (unsloth_zoo/loss_utils.py:660-672) where the bare loop does not; a recompile
# limit hit falls back to eager blocks (unsloth/models/_utils.py:5981), one suspect for micro-batch 1's gap.
export TORCH_LOGS=recompiles
run() {  # name, seconds (cut to what is left of the call's 575 s), args...
  local name=$1 secs=$2; shift 2
  [ $secs -gt $((575 - SECONDS)) ] && secs=$((575 - SECONDS))
  timeout "$secs" python3 bench/train_throughput.py --out /tmp/$name "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $? after ${SECONDS}s"
  cp /tmp/$name/train_throughput.json "$OUT/$name.json" 2>/dev/null
  for p in rigplan bare hf hf-plain; do  # Unsloth's choices (block compile, padding-free), then the log's end
    [ -f /tmp/$name/log-$p.txt ] && { grep -iE "unsloth.*(compil|padd|eager)|padding-free|recompil" /tmp/$name/log-$p.txt | head -40
      echo ...; tail -c 4000 /tmp/$name/log-$p.txt; } >"$OUT/$name-$p.tail.txt"
  done
  tail -n 8 "$OUT/$name.log"
}
LORA="--method lora --examples 224 --steps 0 --plan-gpu rtx-4090"  # the same replica, data and plan in every call (fixed seeds)
QLORA="--method qlora --examples 160 --steps 0 --plan-gpu rtx-4090"
for mode in "${@:-lora}"; do  # several modes run one after another, within the one call
  case "$mode" in
    lora)       run tp-lora 530 $LORA --parts rigplan,bare,hf ;;
    lora-plain) run tp-lora-plain 530 $LORA --parts hf-plain ;;
    lora-mb2)   run tp-lora-mb2 530 $LORA --micro-batch 2 --parts rigplan,bare,hf ;;
    lora-plain-mb2) run tp-lora-plain-mb2 530 $LORA --micro-batch 2 --parts hf-plain ;;
    qlora)      run tp-qlora 530 $QLORA --parts rigplan,bare,hf ;;
    qlora-mb2)  run tp-qlora-mb2 530 $QLORA --micro-batch 2 --parts rigplan,bare,hf ;;
    # rigplan and bare under cProfile on the rtx-4090's QLoRA plan, where the trainer ran 0.86x the bare loop
    # (h100-tp7-qlora-4090.json): profile-*.txt say where its host time goes.
    profile-4090) run tp-profile-4090 530 --method qlora --examples 96 --steps 0 --plan-gpu rtx-4090 --parts rigplan,bare --profile
      cp /tmp/tp-profile-4090/profile-*.txt "$OUT/" 2>/dev/null ;;
    # The trainer with each of its costs taken away (bench/train_throughput.py VARIANTS), same plan and data.
    variants-4090) run tp-variants-4090 560 --method qlora --examples 96 --steps 0 --plan-gpu rtx-4090 \
      --parts bare,rigplan,rigplan-noclip,rigplan-inplace,rigplan-noclip-inplace-nolog ;;
    # The H100's LoRA plan (micro-batch 4 x 4, padding-free: 0.9497x the bare loop in h100-tp11-own-lora.json)
    # with the trainer run twice and once with gradients accumulated in place, to tell its cost from noise.
    variants-own-lora) run tp-variants-own-lora 560 --method lora --examples 500 --steps 0 --plan-gpu auto \
      --parts bare,rigplan,rigplan-inplace,rigplan@2 ;;
    qlora-4090) run tp-qlora-4090 530 --method qlora --examples 240 --steps 0 --plan-gpu rtx-4090 --parts rigplan,bare,hf-plain ;;
    # ~500 examples, as issue 4 asks: 224 took 309 s for the three LoRA parts (66 s each to load and compile,
    # then 7,500, 7,300 and 5,200 tok/s of ~1,080-token examples). On today's padding-free plans own-lora took
    # 388 s (h100-tp11), own-qlora 355 s on 400 examples (h100-tp9), so QLoRA too gets 500 now.
    own-lora)   run tp-own-lora 530 --method lora --examples 500 --steps 0 --plan-gpu auto --parts rigplan,bare,hf-plain ;;
    own-qlora)  run tp-own-qlora 560 --method qlora --examples 500 --steps 0 --plan-gpu auto --parts rigplan,bare,hf-plain ;;
    own-lora-padded)  run tp-own-lora-padded 530 --method lora --examples 224 --steps 0 --plan-gpu auto --parts rigplan,bare --batching padded ;;
    own-qlora-padded) run tp-own-qlora-padded 530 --method qlora --examples 160 --steps 0 --plan-gpu auto --parts rigplan,bare --batching padded ;;
    own-qlora-pf)     run tp-own-qlora-pf 530 --method qlora --examples 160 --steps 0 --plan-gpu auto --parts rigplan ;;
    # own-qlora's data at micro-batch 4 padded, the three parts: rigplan ran it fastest of the H100's QLoRA
    # choices (h100-tp6-qlora-mb4-padded.json, rigplan alone), where the estimate ranked it last.
    own-qlora-mb4-padded) run tp-own-qlora-mb4-padded 560 --method qlora --examples 400 --steps 0 --plan-gpu auto \
      --micro-batch 4 --batching padded --parts rigplan,bare,hf-plain ;;
    # The planner's QLoRA choice on the H100 (micro-batch 4, padding-free: padded would be 67% real tokens)
    # against its alternatives on one machine, rigplan alone: micro-batch 2 padded, 4 padded, 4 padding-free.
    qlora-choice)
      for v in "2 padded" "4 padded" "4 padding-free"; do set -- $v
        run tp-qlora-mb$1-$2 190 --method qlora --examples 400 --steps 0 --plan-gpu auto --parts rigplan \
          --micro-batch $1 --batching $2; done ;;
    # Padding-free against padded at larger micro-batches, rigplan alone, one machine: QLoRA at micro-batch 8
    # padding-free (own-qlora's plan: 12,769 tok/s where 9,559 was predicted, h100-tp9-own-qlora.json) and LoRA
    # at 4, padding-free and padded. Logs and JSON go into one archive ($OUT brings back 8 files at most).
    pf-sweep)
      for v in "qlora 8 padding-free" "lora 4 padding-free" "lora 4 padded" "lora 2 padding-free"; do set -- $v
        run tp-$1-mb$2-$3 150 --method $1 --examples 320 --steps 0 --plan-gpu auto --parts rigplan \
          --micro-batch $2 --batching $3; done
      (cd "$OUT" && tar czf pf-sweep.tgz tp-*-mb* && rm -f tp-*-mb*) ;;
    equal)      run tp-equal 530 --method lora --plan-gpu auto --words 2000 --examples 128 --steps 0 \
                  --parts rigplan,bare ;;
    *) echo "unknown mode $mode (see the list at the top)"; exit 2 ;;
  esac
done
