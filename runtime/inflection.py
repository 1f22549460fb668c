"""Whether one word is another respelled by a writer's slip: a letter dropped, added, changed or
two swapped (two in a long word), or the same English word in another form (a regular suffix, an
irregular verb's or noun's forms, an apostrophe). A weak LLM's respellings are other words
("Shothand" -> "Shohad", "pytree" -> "tree").
"""

from __future__ import annotations

# Regular endings a writer confuses: number, tense, aspect, comparison, adverb.
SUFFIXES = ("", "s", "es", "ed", "d", "ing", "er", "est", "ly")
LONG = 8  # letters from which a word may hold two slips ("tommorow", "dissapointed")

# Common English irregular verbs (base, past, past participle, and other forms where they differ)
# and nouns (singular, plural).
_IRREGULAR = """
arise arose arisen; awake awoke awoken; be is am are was were been being; bear bore born borne;
beat beaten; become became; begin began begun; bend bent; bet; bind bound; bite bit bitten;
bleed bled; blow blew blown; break broke broken; breed bred; bring brought; build built;
burn burnt; buy bought; catch caught; choose chose chosen; cling clung; come came; cost; creep
crept; cut; deal dealt; dig dug; do does did done; draw drew drawn; dream dreamt; drink drank drunk;
drive drove driven; eat ate eaten; fall fell fallen; feed fed; feel felt; fight fought; find found;
flee fled; fly flew flown; forbid forbade forbidden; forget forgot forgotten; forgive forgave
forgiven; freeze froze frozen; get got gotten; give gave given; go goes went gone; grind ground;
grow grew grown; hang hung; have has had; hear heard; hide hid hidden; hit; hold held; hurt;
keep kept; kneel knelt; know knew known; lay laid; lead led; lean leant; leap leapt; learn learnt;
leave left; lend lent; let; lie lay lain; light lit; lose lost; make made; mean meant; meet met;
pay paid; prove proven; put; quit; read; ride rode ridden; ring rang rung; rise rose risen; run ran;
say said; see saw seen; seek sought; sell sold; send sent; set; shake shook shaken; shine shone;
shoot shot; show shown; shrink shrank shrunk; shut; sing sang sung; sink sank sunk; sit sat;
sleep slept; slide slid; speak spoke spoken; speed sped; spend spent; spin spun; split; spread;
spring sprang sprung; stand stood; steal stole stolen; stick stuck; sting stung; stink stank
stunk; strike struck; swear swore sworn; sweep swept; swim swam swum; swing swung; take took taken;
teach taught; tear tore torn; tell told; think thought; throw threw thrown; understand understood;
wake woke woken; wear wore worn; weave wove woven; weep wept; win won; wind wound; write wrote written;
child children; tooth teeth; foot feet; man men; woman women; person people; mouse mice; goose geese;
life lives; wife wives; knife knives; leaf leaves; half halves; wolf wolves; shelf shelves
"""
_WORD: dict[str, int] = {form: n for n, forms in enumerate(_IRREGULAR.split(";")) for form in forms.split()}


def slip(old: str, new: str) -> bool:
    """Whether `new` (lower-case letters, as `old`) is `old` with a writer's slip fixed: one letter
    dropped, added, changed or two neighbours swapped (two such in words of `LONG` letters); another
    regular form of the same stem (`SUFFIXES`, the stem respelled so: "studied" -> "study", "running"
    -> "run"); another form of one irregular verb or noun ("finding" -> "found", "childs" ->
    "children"); or the same with an apostrophe dropped, added or moved ("your" -> "you're",
    "doesn't" -> "don't")."""
    old, new = old.replace("’", "'"), new.replace("’", "'")
    if old == new:
        return True
    if "'" in old or "'" in new:
        bare_old, bare_new = old.replace("'", ""), new.replace("'", "")
        if old.endswith("n't") and new.endswith("n't") and max(len(old), len(new)) <= 8:
            return True
        return bare_old == bare_new or _slipped(bare_old, bare_new)
    return _slipped(old, new)


def _slipped(a: str, b: str) -> bool:
    most = 2 if min(len(a), len(b)) >= LONG else 1
    return (distance(a, b, most) <= most or _same_stem(a, b) or _same_stem(b, a)
            or _WORD.get(_base(a), -1) == _WORD.get(_base(b), -2))


def distance(a: str, b: str, most: int) -> int:
    """The optimal-string-alignment distance of `a` and `b` (letters dropped, added, changed, two
    neighbours swapped), or `most + 1` once it is certain to exceed `most`."""
    if abs(len(a) - len(b)) > most:
        return most + 1
    before, row = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (a[i - 1] != b[j - 1]))
            if before is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) > most:
            return most + 1
        before, row = row, current
    return row[-1]


def _same_stem(a: str, b: str) -> bool:
    for end_a in SUFFIXES:
        if not a.endswith(end_a):
            continue
        stem_a = a[: len(a) - len(end_a)]
        for end_b in SUFFIXES:
            if b.endswith(end_b):
                stem_b = b[: len(b) - len(end_b)]
                if len(stem_a) > 2 and (stem_a == stem_b or distance(stem_a, stem_b, 1) <= 1):
                    return True
    return False


def _base(word: str) -> str:
    """An irregular word's listed form: its regular-looking forms ("begins", "beginning", "teached",
    "childs") are a writer's too."""
    if word in _WORD:
        return word
    for end in ("ing", "es", "s", "ed", "d"):
        stem = word[: len(word) - len(end)]
        if word.endswith(end) and stem:
            for guess in (stem, stem + "e", stem[:-1]):  # "making", "running"
                if guess in _WORD:
                    return guess
    return word
