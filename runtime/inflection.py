"""Whether one word is another respelled by a writer's slip: a letter dropped, added, changed or
two swapped, or the same English word in another form (a regular suffix, an irregular verb's
forms). A weak LLM's respellings are other words ("Shothand" -> "Shohad", "pytree" -> "tree").
"""

from __future__ import annotations

# Regular endings a writer confuses: number, tense, aspect, comparison, adverb.
SUFFIXES = ("", "s", "es", "ed", "d", "ing", "er", "est", "ly")

# Common English irregular verbs: base, past, past participle (and other forms where they differ).
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
wake woke woken; wear wore worn; weave wove woven; weep wept; win won; wind wound; write wrote written
"""
_VERB: dict[str, int] = {form: n for n, forms in enumerate(_IRREGULAR.split(";")) for form in forms.split()}


def slip(old: str, new: str) -> bool:
    """Whether `new` (lower-case letters, as `old`) is `old` with a writer's slip fixed: one letter
    dropped, added, changed or two neighbours swapped; another regular form of the same stem
    (`SUFFIXES`, a stem respelled by one letter: "studied" -> "study", "running" -> "run"); another
    form of one irregular verb ("finding" -> "found"); or a contraction's ("doesn't" -> "don't")."""
    if old == new:
        return True
    if old.endswith("n't") and new.endswith("n't"):
        return slip(old[:-3], new[:-3]) or max(len(old), len(new)) <= 8
    return _one_letter(old, new) or _same_stem(old, new) or _same_verb(old, new)


def _one_letter(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance at most 1."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) <= 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _same_stem(a: str, b: str) -> bool:
    for end_a in SUFFIXES:
        if not a.endswith(end_a):
            continue
        stem_a = a[: len(a) - len(end_a)]
        for end_b in SUFFIXES:
            if b.endswith(end_b):
                stem_b = b[: len(b) - len(end_b)]
                if len(stem_a) > 2 and (stem_a == stem_b or _one_letter(stem_a, stem_b)):
                    return True
    return False


def _same_verb(a: str, b: str) -> bool:
    verb = _VERB.get(_base(a))
    return verb is not None and verb == _VERB.get(_base(b))


def _base(word: str) -> str:
    """An irregular verb's form as listed: its -s and -ing forms are regular ("begins", "beginning")."""
    if word in _VERB:
        return word
    for end in ("ing", "s", "es"):
        stem = word[: len(word) - len(end)]
        if word.endswith(end) and stem:
            for guess in (stem, stem + "e", stem[:-1]):  # "making", "running"
                if guess in _VERB:
                    return guess
    return word
