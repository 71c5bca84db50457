"""Decontamination rules (twinlm.data.fetch.decontam) on small synthetic texts: no fetched data needed."""

import pytest

from twinlm.data.fetch.decontam import MIN_PASSAGE_WORDS, NGRAM, EvalIndex, decontaminate_many, normalize_words

# 19 words: its 13-word runs are indexed
LONG = ("the committee decided after a long and heated debate that the old bridge across the river "
        "should be rebuilt")
# 8 words: indexed as a whole passage
SHORT = "a completely unique eight word evaluation sentence here"
WORDS = LONG.split()
CLEAN = "Nothing in this paragraph comes from the evaluation data at all, it is fresh text."


@pytest.fixture(scope="module")
def index():
    return EvalIndex.build([LONG, SHORT, LONG, "too short to count", "a b c d e f g h"])


def test_the_rule_constants():
    assert (NGRAM, MIN_PASSAGE_WORDS) == (13, 8)


def test_normalisation_ignores_case_and_punctuation():
    assert normalize_words("Don't STOP-me,  café_1!\n") == ["don", "t", "stop", "me", "café_1"]


def test_index_holds_13_word_runs_and_whole_short_passages(index):
    # a duplicate counts once; a passage under 16 characters ("a b c d e f g h") is not indexed at all;
    # "too short to count" (4 words) is read but yields no run
    assert index.passages == 3
    assert len(index.hashes) == (len(WORDS) - NGRAM + 1) + 1


def test_a_13_word_overlap_is_found_a_12_word_one_is_not(index):
    assert index.hits(" ".join(WORDS[2:15]))
    assert index.hits("Intro: " + " ".join(WORDS[3:16]) + " and more words of ours.")
    assert not index.hits(" ".join(WORDS[2:14]))  # 12 words of a long passage: kept
    assert not index.hits(CLEAN)


def test_case_punctuation_and_spacing_do_not_hide_an_overlap(index):
    text = "Intro: THE Committee -- decided, after a long\nand heated-debate; that the OLD bridge!"
    assert index.hits(text)


def test_a_whole_short_passage_is_found_anywhere_but_not_a_part_of_it(index):
    assert index.hits(f"They wrote: {SHORT.upper()}, and left.")
    assert not index.hits(" ".join(SHORT.split()[:7]))
    assert not index.hits("a b c d e f g h")


def test_an_overlap_never_spans_two_texts(index):
    assert not index.hits_many([" ".join(WORDS[:7]), " ".join(WORDS[7:14])]).any()


def test_overlapping_paragraphs_are_dropped_and_the_rest_kept(index):
    text = f"{CLEAN}\n\nIntro. {LONG.upper()}, they said.\n\nAnother clean one without overlap."
    other = "This short piece is unrelated to the evaluation text."
    out, dropped = decontaminate_many([text, CLEAN, other], index)
    assert out == [f"{CLEAN}\n\nAnother clean one without overlap.", CLEAN, other]
    assert dropped == 1


def test_a_short_passage_inside_a_paragraph_drops_that_paragraph(index):
    text = f"{CLEAN}\n\nAs the item said, {SHORT}; then we moved on."
    out, dropped = decontaminate_many([text], index)
    assert out == [CLEAN] and dropped == 1


def test_a_12_word_overlap_is_kept(index):
    text = f"{CLEAN}\n\nWe read that {' '.join(WORDS[2:14])} and nothing else."
    assert decontaminate_many([text], index) == ([text], 0)


def test_a_single_paragraph_loses_only_the_overlapping_sentence(index):
    text = f"Clean first sentence here. {LONG}. A clean last one!"
    assert decontaminate_many([text], index) == (["Clean first sentence here. A clean last one!"], 1)


def test_an_overlap_across_a_paragraph_break_drops_the_document(index):
    text = f"Para one is clean.\n\nIt said {' '.join(WORDS[:7])}\n\n{' '.join(WORDS[7:14])} end.\n\nLast clean."
    assert decontaminate_many([text], index) == ([""], 0)


def test_no_index_changes_nothing():
    assert decontaminate_many([LONG, SHORT], None) == ([LONG, SHORT], 0)
    assert not EvalIndex().hits(LONG)


def test_decontamination_drops_overlapping_paragraphs():
    # (moved from test_data_fetch.py)
    passage = ("The committee decided after a long and heated debate that the old bridge across the river "
               "should be rebuilt")
    short = "a completely unique eight word evaluation sentence here"
    index = EvalIndex.build([passage, short, "too short to count"])
    clean = "Nothing in this paragraph comes from the evaluation data at all, it is fresh text."
    text = f"{clean}\n\nIntro. {passage.upper()}, they said.\n\nAnother clean one without overlap."
    out, dropped = decontaminate_many([text, clean, f"Say: {short}!", "too short to count, really"], index)
    assert dropped >= 2
    assert out[0] == f"{clean}\n\nAnother clean one without overlap."
    assert out[1] == clean and out[3] == "too short to count, really"
    assert short not in out[2]
