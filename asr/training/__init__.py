"""Training: `asr train` runs a LightningCLI recipe into a run folder.

    asr train --config recipes/synth/tiny.yaml [--trainer.max_epochs 3] [--model.lr 5e-4] [--ckpt_path last]

The run folder is `trainer.default_root_dir` (runs/<recipe name> when the recipe leaves it unset). It
receives config.yaml (the resolved config), best.ckpt (best dev WER), last.ckpt (every
`checkpoint_every_n_steps` steps, every `checkpoint_every_minutes`, every epoch, and on a stop
signal), TensorBoard and CSV logs, lm.arpa, and at the end report.json + report.md: accuracy on
the test splits (greedy and beam+LM) next to training speed.

Checkpoints are written to a temporary file in the same folder and renamed over the old one, so a
kill at any moment leaves the previous checkpoint intact. `--ckpt_path last` resumes from the run
folder's last.ckpt exactly where it stopped, mid-epoch included: the batch order is a function of
(seed, epoch) and the training loader records how many batches of the epoch were consumed.

  module.py       SpeechRecognizer, the LightningModule (CTC loss, optimiser, dev WER)
  checkpoints.py  atomic checkpoint writes; checkpoints by steps, by time and on stop signals
  resume.py       what a mid-epoch resume needs: the resumable loader and metrics.csv
  run_folder.py   the run folder: its files, its lock, the saved config
  finish.py       the end of a run: language model, beam tuning, evaluation, report
  cli.py          TrainCLI and main()
"""
