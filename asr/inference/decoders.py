"""The decoders a recognizer uses, and where its word LM comes from.

The beam decoder needs an ARPA word LM. Unless one is given (DecodingOptions.lm), it is the LM that
training left in the checkpoint's run folder (lm.arpa), else one built from the transcripts of the
splits the checkpoint was trained on (recorded in the checkpoint or in the run folder's config.yaml).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Iterable

from asr.decode import BeamLMDecoder, Decoder, GreedyDecoder
from asr.errors import UserError
from asr.inference.options import BEAM_NAME, DECODERS, DecodingOptions

LM_FILE = "lm.arpa"  # the word LM training leaves in its run folder
RUN_CONFIG_FILE = "config.yaml"  # the resolved config training saves in its run folder
LM_ORDER = 3  # of an LM built here from training transcripts


def arpa_vocabulary(path: str | Path) -> list[str]:
    """The words of an ARPA model's unigram section (without <s>, </s>, <unk>)."""
    words = []
    in_unigrams = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in ("<s>", "</s>", "<unk>"):
                    words.append(fields[1])
    if not words:
        raise UserError(f"{path}: not an ARPA language model (no unigrams)")
    return words


def build_decoders(tokenizer, options: DecodingOptions, lm_path: str | Path | None = None,
                   lexicon: Iterable[str] | None = None) -> dict[str, Decoder]:
    """{"greedy": ..., "beam+lm": ...} as options.decoder asks. The beam decoder's lexicon is `lexicon`
    (training words) or, without it, the LM's vocabulary; its LM is lm_path, else options.lm."""
    if options.decoder not in DECODERS:
        raise UserError(f"--decoder {options.decoder!r}: expected one of {', '.join(DECODERS)}")
    decoders: dict[str, Decoder] = {}
    if options.decoder in ("greedy", "both"):
        decoders["greedy"] = GreedyDecoder(tokenizer)
    if options.beam:
        lm_path = lm_path if lm_path is not None else options.lm
        if lm_path is None:
            raise UserError("the beam decoder needs a language model: give --lm, or a checkpoint that records its "
                            "training splits")
        words = list(lexicon) if lexicon is not None else arpa_vocabulary(lm_path)
        decoders[BEAM_NAME] = BeamLMDecoder(tokenizer, lm_path, words, beam_size=options.beam_size,
                                            lm_weight=options.lm_weight, word_score=options.word_score)
    return decoders


def _data_section_of_run_config(checkpoint: Path) -> dict:
    """The `data` section of the resolved config that training saved in the checkpoint's run
    folder (config.yaml beside the checkpoint), or {}."""
    import yaml

    config_path = checkpoint.parent / RUN_CONFIG_FILE
    if not config_path.is_file():
        return {}
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    data = config.get("data") if isinstance(config, dict) else None
    return data.get("init_args", data) if isinstance(data, dict) else {}


def run_language_model(checkpoint: str | Path | None) -> Path | None:
    """The word LM that training left in the checkpoint's run folder (lm.arpa), if any."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).parent / LM_FILE
    return path if path.is_file() else None


def recorded_training_texts(model, checkpoint: str | Path | None = None) -> list[str] | None:
    """The transcripts a checkpoint was trained on, where it says which: `model.training_texts`
    (a list), `model.data_config` ({"root", "train_splits"}), or the run folder's config.yaml.
    None if none of them tells."""
    texts = getattr(model, "training_texts", None)
    if texts:
        return list(texts)
    config = getattr(model, "data_config", None) or {}
    if not config.get("train_splits") and checkpoint is not None:
        config = _data_section_of_run_config(Path(checkpoint))
    splits, root = config.get("train_splits"), config.get("root")
    if not splits or not root:
        return None
    from asr.data.librispeech import load_split

    return [u.text for split in splits for u in load_split(root, split)]


def decoders_for_checkpoint(model, options: DecodingOptions, checkpoint: str | Path | None) -> dict[str, Decoder]:
    """The decoders options ask for, with the beam decoder's LM found as the module docstring says."""
    if not options.beam:
        return build_decoders(model.tokenizer, options)
    # the decoder reads the LM into memory when it is built: a temporary one can go right after
    with tempfile.TemporaryDirectory(prefix="asr-lm-") as tmp:
        lm_path = options.lm or run_language_model(checkpoint)
        if lm_path is None:
            texts = recorded_training_texts(model, checkpoint)
            if texts:
                from asr.lm import build_arpa

                print(f"building a {LM_ORDER}-gram word LM from {len(texts)} training transcripts", file=sys.stderr)
                lm_path = build_arpa(texts, Path(tmp) / LM_FILE, order=LM_ORDER)
        return build_decoders(model.tokenizer, options, lm_path)
