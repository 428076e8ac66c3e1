"""The sentence splitter and the abbreviation policy of asr.data.sentences."""

import pytest

from asr.data.sentences import load_sentences, speakable, split_sentences
from asr.data.text import normalize_text

SPLITS = [
    # titles before a name never end a sentence
    ("Mr. Smith went to Washington. He liked it.", ["Mr. Smith went to Washington.", "He liked it."]),
    ("I met Dr. Jones at St. Paul's.", ["I met Dr. Jones at St. Paul's."]),
    ("Mrs. Brown met Prof. Plum and Gen. Lee. They talked.",
     ["Mrs. Brown met Prof. Plum and Gen. Lee.", "They talked."]),
    ("Ms. Green left. Capt. Hook stayed.", ["Ms. Green left.", "Capt. Hook stayed."]),
    # e.g., i.e., vs., cf. never end one; etc. and a.m./p.m. do only before a capitalised word
    ("Use a tool, e.g. a hammer, for that. Then stop.", ["Use a tool, e.g. a hammer, for that.", "Then stop."]),
    ("Take a fruit, e.g. Apples are good. Eat one.", ["Take a fruit, e.g. Apples are good.", "Eat one."]),
    ("Be brief, i.e. short. Then go.", ["Be brief, i.e. short.", "Then go."]),
    ("It was cats vs. Dogs all day. Nobody won.", ["It was cats vs. Dogs all day.", "Nobody won."]),
    ("Bring pens, paper, etc. and come early. Bye now.", ["Bring pens, paper, etc. and come early.", "Bye now."]),
    ("Bring pens, paper, etc. Then come early.", ["Bring pens, paper, etc.", "Then come early."]),
    ("It was five p.m. when we left.", ["It was five p.m. when we left."]),
    ("We left at five p.m. Then it rained.", ["We left at five p.m.", "Then it rained."]),
    ("He rose at six a.m. and ran.", ["He rose at six a.m. and ran."]),
    # initials
    ("J. R. R. Tolkien wrote it. Everyone read it.", ["J. R. R. Tolkien wrote it.", "Everyone read it."]),
    ("The poet T. S. Eliot liked cats.", ["The poet T. S. Eliot liked cats."]),
    # Jr./Sr. after a name end a sentence only before a capitalised word
    ("John Smith, Jr. left early. He was tired.", ["John Smith, Jr. left early.", "He was tired."]),
    ("It was signed by John Smith, Jr. Nobody cared.", ["It was signed by John Smith, Jr.", "Nobody cared."]),
    # No. before a number word
    ("He lived at No. Nine on the hill. It was cold.", ["He lived at No. Nine on the hill.", "It was cold."]),
    ("I said No. Nobody listened.", ["I said No.", "Nobody listened."]),
    # acronyms: letters with periods inside a sentence
    ("The U.S. economy is big. It grows.", ["The U.S. economy is big.", "It grows."]),
    # a lowercase word after ! or ? or a quote: the same sentence
    ('"Why?" he asked. Nobody knew.', ['"Why?" he asked.', "Nobody knew."]),
    ('"Stop!" she cried, and ran. It worked.', ['"Stop!" she cried, and ran.', "It worked."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    # what did split before still does
    ("A stitch in time saves nine. Look before you leap! Is it true?",
     ["A stitch in time saves nine.", "Look before you leap!", "Is it true?"]),
    ("One thing. 16. Another thing.", ["One thing.", "16.", "Another thing."]),
    ("No end here", ["No end here"]),
]


@pytest.mark.parametrize("text,expected", SPLITS)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


SPOKEN = [
    # written out in the text the engine reads, so the transcript says what the voice says
    ("Mr. Smith went to Washington.", "MISTER SMITH WENT TO WASHINGTON"),
    ("Mr Gandhi, what do you think?", "MISTER GANDHI WHAT DO YOU THINK"),
    ("Ask Mrs. Brown about it.", "ASK MISSUS BROWN ABOUT IT"),
    ("I met Dr. Jones at St. Paul's.", "I MET DOCTOR JONES AT SAINT PAUL'S"),
    ("Dr Who is on tonight.", "DOCTOR WHO IS ON TONIGHT"),
    ("Prof. Plum did it with Col. Mustard.", "PROFESSOR PLUM DID IT WITH COLONEL MUSTARD"),
    ("Gen. Lee met Lt. Dan and Sgt. Pepper.", "GENERAL LEE MET LIEUTENANT DAN AND SERGEANT PEPPER"),
    ("Capt. Hook and Rev. Green climbed Mt. Everest.", "CAPTAIN HOOK AND REVEREND GREEN CLIMBED MOUNT EVEREST"),
    ("John Smith, Jr. left early.", "JOHN SMITH JUNIOR LEFT EARLY"),
    ("It was signed by John Smith, Sr.", "IT WAS SIGNED BY JOHN SMITH SENIOR"),
    ("Use a tool, e.g. a hammer, for that.", "USE A TOOL FOR EXAMPLE A HAMMER FOR THAT"),
    ("E.g. a hammer will do.", "FOR EXAMPLE A HAMMER WILL DO"),
    ("Be brief, i.e. short.", "BE BRIEF THAT IS SHORT"),
    ("Bring pens, paper, etc.", "BRING PENS PAPER ET CETERA"),
    ("Bring pens, paper, etc. and come.", "BRING PENS PAPER ET CETERA AND COME"),
    ("It was cats vs. dogs all day.", "IT WAS CATS VERSUS DOGS ALL DAY"),
    ("It was cats vs dogs all day.", "IT WAS CATS VERSUS DOGS ALL DAY"),
    ("He lived at No. nine on the hill.", "HE LIVED AT NUMBER NINE ON THE HILL"),
    # letters: both engines spell them, as the transcript does
    ("It was five p.m. when we left.", "IT WAS FIVE P M WHEN WE LEFT"),
    ("He rose at six a.m. and ran.", "HE ROSE AT SIX A M AND RAN"),
    ("The U.S. economy is big.", "THE U S ECONOMY IS BIG"),
    ("What's your G.P.A.?", "WHAT'S YOUR G P A"),
    ("J. R. R. Tolkien wrote it.", "J R R TOLKIEN WROTE IT"),
    # nothing to do
    ("I said No.", "I SAID NO"),
    ("He said \"Stop.\" and left.", "HE SAID STOP AND LEFT"),
    ("The doctor is in.", "THE DOCTOR IS IN"),
]


@pytest.mark.parametrize("raw,transcript", SPOKEN)
def test_speakable_writes_abbreviations_out(raw, transcript):
    spoken = speakable(raw)
    assert spoken is not None
    assert normalize_text(spoken) == transcript
    assert spoken[-1] == raw[-1]  # the sentence keeps its final punctuation


def test_speakable_keeps_the_sentence_start_capitalised():
    assert speakable("E.g. a hammer will do.") == "For example a hammer will do."
    assert speakable("Vs. what?") == "Versus what?"


DROPPED = [
    "Ask Ms. Green about it.",  # letters or "miz"
    "Ask Ms Green about it.",
    "He lives on Baker St. near the park.",  # a street, not a saint
    "He lives on Baker St.",
    "Turn left at Mulholland Dr. and stop.",
    "Ask the dr. about it.",  # lowercase: not a title before a name
    "Call MR Jones today.",  # capitals: spelled by one engine, "mister" to the other
    "Cosmotronic Software Unlimited Inc.",  # ends in an abbreviation
    "This dungeon is owned by Frobozz Magic Co.",
    "He moved to Fifth Ave.",
    "Send it by Sept.",
    "The meeting was with Mr.",  # a title at the end: a fragment
    "Try sci.physics for that.",  # a period inside a word is read "dot"
    "The average Ph.D. thesis is long.",
    "There are no threads in a.b.p.erotica today.",
    "So the C.I.A decided to act.",
    "Compare this, cf. the other one.",
]


@pytest.mark.parametrize("raw", DROPPED)
def test_speakable_drops_ambiguous_abbreviations(raw):
    assert speakable(raw) is None


def _fortune_db(directory, name, entries):
    (directory / name).write_text("\n%\n".join(entries) + "\n", encoding="utf-8")
    (directory / f"{name}.dat").write_bytes(b"\0" * 24)


def test_load_sentences_uses_the_splitter_and_the_policy(tmp_path):
    _fortune_db(tmp_path, "people", [
        "Mr. Smith went to Washington. He liked it a lot.",
        "I met Dr. Jones at St. Paul's yesterday.",
        "Use a tool, e.g. a hammer, for that job. Then stop doing it.",
        "Ask Ms. Green about the old house. She knows the whole story.",
        '"Why is it so?" he asked the teacher.',
    ])
    got = [(s.text, s.spoken) for s in load_sentences(tmp_path)]
    assert got == [
        ("MISTER SMITH WENT TO WASHINGTON", "Mister Smith went to Washington."),
        ("HE LIKED IT A LOT", "He liked it a lot."),
        ("I MET DOCTOR JONES AT SAINT PAUL'S YESTERDAY", "I met Doctor Jones at Saint Paul's yesterday."),
        ("USE A TOOL FOR EXAMPLE A HAMMER FOR THAT JOB", "Use a tool, for example a hammer, for that job."),
        ("THEN STOP DOING IT", "Then stop doing it."),
        ("SHE KNOWS THE WHOLE STORY", "She knows the whole story."),  # its neighbour with "Ms." is dropped
        ("WHY IS IT SO HE ASKED THE TEACHER", 'Why is it so?" he asked the teacher.'),  # one sentence
    ]
