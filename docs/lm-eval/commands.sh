#!/bin/bash
# run from the repository root (2026-12-03, branch issue23 at its merge)
date -u
/usr/bin/time -v python -m cacheaug_engine.cli lm-eval --tasks cacheaug_arith3_ll,cacheaug_arith3_mc,cacheaug_arith3 \
  --coprocessor cacheaug_engine/assets/addition-coprocessor --pause cacheaug_engine/assets/addition-pause \
  --limit 16 --batch-size 8 --device cpu --out runs/lm-eval/add > runs/lm-eval/add.log 2>&1
date -u
/usr/bin/time -v python -m cacheaug_engine.cli lm-eval --tasks cacheaug_gsm_answer_ll,cacheaug_gsm_mc \
  --limit 8 --batch-size 8 --device cpu --out runs/lm-eval/text > runs/lm-eval/text.log 2>&1
date -u
