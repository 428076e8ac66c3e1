"""Natural English sentences from an offline source: Debian's fortune databases.

Each fortune is split into sentences; attributions, verse fragments, code, ASCII art and anything
with digits or symbols that TTS would read aloud are dropped, so that the normalised transcript is
exactly what the voice says.

Sentence boundaries (`split_sentences`): a ".", "!" or "?" (closing quotes and brackets may follow)
ends a sentence unless the next word starts with a lowercase letter ('"Why?" he asked.' is one),
and a "." never does after a title ("Mr.", "Dr.", "St.", "Prof.", ...), a single-letter initial
("J. R. R. Tolkien"), "e.g.", "i.e.", "vs.", "cf." or "No." before a number word. "etc.", "a.m.",
"p.m.", "Jr." and acronyms ("U.S.") end a sentence when a word that is not lowercase follows ("We
left at five p.m. Then it rained."). A wrong guess there ("the U.S. Army") only moves a boundary:
both parts are still transcribed as spoken.

Abbreviations (`speakable`): espeak-ng and flite do not read them alike ("vs." is "V S" to one and
"versus" to the other, "e.g." is "for example" or "E G", "Jr." is "J R" to both), and both say
"mister" for "Mr." where the normalised transcript would say "MR". So an abbreviation whose reading
is fixed is written out in the text given to the engine, and the transcript is made from that text,
so the two agree whatever the engine would have done:
  Mr -> Mister, Mrs -> Missus (with or without the period); before a capitalised name: Dr. -> Doctor,
  St. -> Saint (not after a capitalised word: "Baker St." is a street), Prof. -> Professor, Gen.,
  Col., Capt., Lt., Sgt., Rev., Mt., Gov. -> General ... Governor; Jr. -> Junior, Sr. -> Senior;
  e.g. -> for example, i.e. -> that is, etc. -> et cetera, vs. -> versus, viz. -> namely;
  No. before a number word -> Number.
Letters with periods ("U.S.", "a.m.", "J. R. R.") are spelled by both engines, as the transcript
writes them ("U S", "A M", "J R R"), and are kept. A sentence that still holds an abbreviation
whose reading is ambiguous is dropped: "Ms." (letters or "miz"), "Dr."/"St." not before a name
(doctor/drive, saint/street), "MR"-style capitals, a word with a period inside ("sci.physics" is
read "sci dot physics", "Ph.D."), or one that ends in "Inc.", "Ltd.", "Ave.", a month, a title, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from asr.data.text import has_unspeakable, normalize_text

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")
# Databases that are not running English prose.
EXCLUDED_DATABASES = {"art", "ascii-art", "translate-me", "perl", "zippy", "knghtbrd", "paradoxum"}
MIN_WORDS = 4
MAX_WORDS = 24

# Titles: written before a name, so a period after one never ends a sentence.
TITLES = frozenset("Mr Mrs Ms Messrs Mme Dr St Prof Gen Col Capt Lt Sgt Rev Mt Gov Hon Fr Sen Rep".split())
# Abbreviations that never end a sentence (compared in lower case, without the last period).
NON_TERMINAL = frozenset({"e.g", "i.e", "vs", "cf", "viz"})
NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand".split())
# A sentence ending in one of these (before its final period) is a fragment or reads ambiguously.
AMBIGUOUS_AT_END = TITLES | frozenset(
    "Inc Co Corp Ltd Bros Ave Rd Blvd Dept Univ Govt Jan Feb Apr Aug Sep Sept Oct Nov Dec Tues Thurs "
    "approx esp dept govt misc ibid vol pp".split())

_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_NEXT_IS_LOWER = re.compile(r"\s+[\"'(\[]*[a-z]")
_NEXT_WORD = re.compile(r"\s+[\"'(\[]*([A-Za-z]+)")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:!?'\"()-]")
_CLOSING = "\"')]"

_ALWAYS = {"Mr": "Mister", "Mrs": "Missus"}
_BEFORE_NAME = {"Dr": "Doctor", "St": "Saint", "Prof": "Professor", "Gen": "General", "Col": "Colonel",
                "Capt": "Captain", "Lt": "Lieutenant", "Sgt": "Sergeant", "Rev": "Reverend", "Mt": "Mount",
                "Gov": "Governor"}
_AFTER_CAPITAL_MEANS_PLACE = {"Dr", "St"}  # "Baker St.", "Mulholland Dr.": a street, not a title
_WORDS = {"jr": "Junior", "sr": "Senior", "e.g": "for example", "i.e": "that is", "etc": "et cetera",
          "vs": "versus", "viz": "namely"}
_RE_ALWAYS = re.compile(r"\b(Mr|Mrs)\b\.?")
_RE_BEFORE_NAME = re.compile(r"\b(" + "|".join(_BEFORE_NAME) + r")\.(?=\s+[\"'(]*[A-Z])|\b(Dr|St)\b(?=\s+[\"'(]*[A-Z])")
_RE_WORDS = re.compile(r"\b(Jr|Sr)\b\.?|\b([Ee]\.g|[Ii]\.e|[Vv]iz)\.|\b([Ee]tc|[Vv]s)\b\.?")
_RE_NUMBER = re.compile(r"\b([Nn])o\.(?=\s+[\"'(]*(" + "|".join(NUMBER_WORDS) + r")\b)", re.IGNORECASE)
_RE_AMBIGUOUS_WORD = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|MR|MRS|MS|DR|ST)\b")
_RE_LAST_WORD = re.compile(r"([A-Za-z]+)\.[\"')\]]*$")


@dataclass(frozen=True)
class Sentence:
    text: str  # LibriSpeech-normalised, what the transcript says
    spoken: str  # what is passed to the TTS engine (original casing and punctuation)
    source: str  # e.g. "fortunes/wisdom"
    entry: str = ""  # the fortune it comes from, e.g. "wisdom:41"; sentences of one entry stay in one split

    @property
    def group(self) -> str:
        return self.entry or self.text


def find_fortune_dir() -> Path | None:
    for d in FORTUNE_DIRS:
        if Path(d).is_dir() and any(Path(d).glob("*.dat")):
            return Path(d)
    return None


def _entries(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for entry in text.split("\n%\n"):
        lines = [ln for ln in entry.splitlines() if not re.match(r"^\s*--", ln)]
        if any(re.match(r"^\s{2,}\S", ln) for ln in lines):  # indented lines: verse, dialogue, code, art
            continue
        yield " ".join(ln.strip() for ln in lines if ln.strip())


def _continues(before: str, after: str) -> bool:
    """True when the period ending `before` belongs to an abbreviation inside the sentence."""
    last = before.split()[-1].lstrip("\"'([")
    if not last.endswith(".") or last.endswith(".."):
        return False  # "!", "?", a closing quote after the period, or an ellipsis: punctuation
    word = last[:-1]
    if word in TITLES or re.fullmatch(r"[A-Z]", word) or word.lower() in NON_TERMINAL:
        return True
    if word in ("No", "no"):
        nxt = _NEXT_WORD.match(after)
        return bool(nxt) and nxt[1].lower() in NUMBER_WORDS
    return False


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences (see the module docstring for where a sentence ends)."""
    sentences, start = [], 0
    for m in _END.finditer(text):
        after = text[m.end():]
        if _NEXT_IS_LOWER.match(after) or _continues(text[start:m.end()], after):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _at_end(text: str, end: int) -> bool:
    return not text[end:].strip(_CLOSING + " ")


def _word_form(word: str, like: str) -> str:
    """`word` capitalised like `like` ("E.g." -> "For example")."""
    return word[0].upper() + word[1:] if like[:1].isupper() else word


def speakable(raw: str) -> str | None:
    """The text to give the TTS engine for one sentence, abbreviations written out (see the module
    docstring); None when it holds an abbreviation whose spoken form is ambiguous."""

    def keep_period(m: re.Match, word: str) -> str:
        # An abbreviation's period that also ends the sentence stays, as the sentence's.
        return word + "." if m[0].endswith(".") and _at_end(m.string, m.end()) else word

    last = _RE_LAST_WORD.search(raw)
    if last and last[1] in AMBIGUOUS_AT_END:
        return None  # "... with Mr.": a fragment; "... Inc.", "... Ave.": read differently by the engines
    text = _RE_ALWAYS.sub(lambda m: keep_period(m, _ALWAYS[m[1]]), raw)

    def title(m: re.Match) -> str:
        abbr = m[1] or m[2]
        previous = m.string[: m.start()].split()
        if abbr in _AFTER_CAPITAL_MEANS_PLACE and previous and previous[-1][:1].isupper():
            return m[0]  # left as it is: the sentence is dropped below
        return _BEFORE_NAME[abbr]

    text = _RE_BEFORE_NAME.sub(title, text)
    text = _RE_WORDS.sub(lambda m: keep_period(m, _word_form(_WORDS[(m[1] or m[2] or m[3]).lower()], m[0])), text)
    text = _RE_NUMBER.sub(lambda m: _word_form("number", m[1]), text)

    if _RE_AMBIGUOUS_WORD.search(text):
        return None
    for m in re.finditer(r"\.", text):
        i = m.end()
        if _at_end(text, i) or text[i] in _CLOSING:
            continue  # the final period, or one before a closing quote: punctuation
        letter_before = m.start() >= 1 and text[m.start() - 1].isalpha()
        single = letter_before and (m.start() < 2 or not text[m.start() - 2].isalpha())
        if not single:
            return None  # an abbreviation left ("Ave.", "Ms.") or a dotted word ("sci.physics")
        if text[i].isalpha() and not re.match(r"[A-Za-z]\.", text[i:]):
            return None  # letters glued to a word: "a.b.p.erotica", "C.I.A decided"
    return text


def _usable(raw: str) -> bool:
    if has_unspeakable(raw) or "_" in raw or "..." in raw or "--" in raw:
        return False
    if not raw or raw[-1] not in ".!?":
        return False
    prose = len(_PROSE_CHARS.findall(raw))
    return prose == len(raw) and raw[0].isupper()


def load_sentences(fortune_dir: Path | None = None) -> list[Sentence]:
    """Every usable sentence, deduplicated by normalised text, in a stable order."""
    fortune_dir = fortune_dir or find_fortune_dir()
    if fortune_dir is None:
        from asr.errors import UserError

        raise UserError(
            f"no fortune databases found in {', '.join(FORTUNE_DIRS)}: install Debian's "
            "'fortune-mod' and 'fortunes' packages (make demo does this when run as root)"
        )
    seen: set[str] = set()
    sentences: list[Sentence] = []
    for db in sorted(p for p in fortune_dir.iterdir() if p.is_file() and not p.suffix and p.with_suffix(".dat").exists()):
        if db.name in EXCLUDED_DATABASES:
            continue
        for entry_no, entry in enumerate(_entries(db)):
            for raw in split_sentences(entry):
                raw = raw.strip().strip("\"'()[] ")
                if not _usable(raw):
                    continue
                spoken = speakable(raw)
                if spoken is None:
                    continue
                text = normalize_text(spoken)
                n_words = text.count(" ") + 1
                if not (MIN_WORDS <= n_words <= MAX_WORDS) or text in seen:
                    continue
                seen.add(text)
                sentences.append(Sentence(text=text, spoken=spoken, source=f"fortunes/{db.name}", entry=f"{db.name}:{entry_no}"))
    return sentences
