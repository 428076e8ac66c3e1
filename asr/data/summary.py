"""Corpus statistics per split: utterances, hours, voices (speakers), distinct words."""

from __future__ import annotations

from asr.data.manifest import Utterance, read_manifest, total_hours


def split_stats(utterances: list[Utterance]) -> dict:
    words = [w for u in utterances for w in u.text.split()]
    return {
        "utterances": len(utterances),
        "hours": round(total_hours(utterances), 4),
        "speakers": len({u.speaker for u in utterances}),
        "words": len(words),
        "distinct_words": len(set(words)),
    }


def format_summary(manifests: dict[str, list[Utterance]]) -> str:
    rows = [f"{'split':<20} {'utts':>7} {'hours':>7} {'voices':>6} {'words':>8} {'distinct':>8}"]
    for split, utterances in manifests.items():
        s = split_stats(utterances)
        rows.append(f"{split:<20} {s['utterances']:>7} {s['hours']:>7.2f} {s['speakers']:>6} {s['words']:>8} {s['distinct_words']:>8}")
    return "\n".join(rows)


def print_summary(manifests: dict[str, list[Utterance]]) -> None:
    print(format_summary(manifests))


def add_arguments(parser) -> None:
    parser.add_argument("manifests", nargs="*", help="manifest files (JSON lines)")
    parser.add_argument("--root", help="corpus root: summarise every manifest under <root>/manifests")


def run(args) -> int:
    from pathlib import Path

    from asr.errors import UserError

    paths = [Path(m) for m in args.manifests]
    if args.root:
        paths += _root_manifests(Path(args.root))
    if not paths:
        raise UserError("give manifest files or --root")
    print_summary({p.stem: read_manifest(p) for p in paths})
    return 0


def _root_manifests(root) -> list:
    """<root>/manifests/*.jsonl, or a UserError saying which of root, manifests/ or the files is missing."""
    from asr.errors import UserError

    if not root.is_dir():
        raise UserError(f"--root {root}: {'not a directory' if root.exists() else 'no such directory'}")
    manifests = root / "manifests"
    if not manifests.is_dir():
        raise UserError(f"--root {root}: has no manifests/ directory (make them with `asr data prepare librispeech --root {root}`)")
    paths = sorted(manifests.glob("*.jsonl"))
    if not paths:
        raise UserError(f"--root {root}: {manifests} holds no *.jsonl manifests")
    return paths
