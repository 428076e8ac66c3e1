#!/usr/bin/env bash
# make demo: render the default corpus, read it back, train the tiny recipe, evaluate, print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
ASR=(.venv/bin/python -m asr.cli)
CORPUS=${CORPUS:-data/synth}
HOURS=${DEMO_HOURS:-9}
SEED=${DEMO_SEED:-0}
RECIPE=${RECIPE:-recipes/synth/tiny.yaml}

start=$(date +%s)
echo "== corpus: $HOURS h of espeak-ng and flite speech in $CORPUS (LibriSpeech layout), read back"
"${ASR[@]}" data synth --out "$CORPUS" --hours "$HOURS" --seed "$SEED"

if [ ! -f "$RECIPE" ]; then
  echo "== $RECIPE not found: stopping after the corpus"
  exit 0
fi
run_dir=$(.venv/bin/python - "$RECIPE" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
print(cfg.get("trainer", {}).get("default_root_dir", "runs/demo"))
PY
)
echo "== building the recurrent op (once; cached under build/ops)"
"${ASR[@]}" ops build
echo "== training $RECIPE into $run_dir (ends with evaluation and the report)"
# --ckpt_path last: a demo that was interrupted resumes, and one that finished is evaluated again
# (a new run into a folder that holds one is refused).
"${ASR[@]}" train --config "$RECIPE" --data.root "$CORPUS" --ckpt_path last
echo "== make demo finished in $(( $(date +%s) - start )) s; report: $run_dir/report.md"
