"""Benchmark prompts: W2 (random common English words) and W1 (random token ids).

Prompts are a pure function of (seed, run_id, tag, index). The run id is fresh for every run
by default, so a server that kept its prefix cache from an earlier run gets no head start;
the tag (e.g. "c8") makes each sweep point use its own prompts for the same reason.
"""
from __future__ import annotations

import random
import time
import uuid

# A fixed vocabulary written out here (no download): about 250 of the most common English
# words, so a 128-word prompt is ~150-180 tokens with any English BPE tokenizer.
_WORDS_TEXT = """
the of and to in is was for on that with as by at from his her which or an be this had not
are but one have were they all their been has when who there more if will would what about
out up into than them can only other new some could time these two may then do first any my
now such like our over man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state
good very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came right
used take three states himself few house use during without again place american around however
home small found thought went say part once general high upon school every does got united left
number course war until always away something fact though water less public put think almost hand
enough far took head yet government system better set told nothing night end why called didn
eyes find going look asked later knew point next city give group toward young let room president
side social given present several order national second possible rather per face among form
important often things looked early white case john become large big need four within felt along
children saw best church ever least power development light thing family interest want members
mind country area others done turned although open god service certain kind problem began different
door thus help sense means whole matter perhaps itself york times law human line above name example
action company hands local show whether five history gave today either act feet across taken past
quite anything seen having death week experience body word half really field am car words already
themselves information tell together college shall money period held keep sure free seems real
behind cannot miss political air question making office brought whose special heard major problems
ago became federal moment study available known result street economic boy position reason change
south board individual job areas society west close turn love community true court force full
""".split()
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS_TEXT))  # de-duplicated, order kept


def new_run_id() -> str:
    """A fresh id per run (time + randomness), recorded in the results so a run can be replayed."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _rng(seed: int, run_id: str, tag: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and
    # Python versions, unlike hash().
    return random.Random(f"{seed}/{run_id}/{tag}/{index}")


def word_prompts(count: int, num_words: int, seed: int = 0, run_id: str = "",
                 tag: str = "") -> list[str]:
    """`count` prompts of exactly `num_words` words drawn uniformly from VOCABULARY."""
    prompts = []
    for i in range(count):
        rng = _rng(seed, run_id, tag, i)
        prompts.append(" ".join(rng.choice(VOCABULARY) for _ in range(num_words)))
    return prompts


def random_token_requests(count: int, input_range: tuple[int, int],
                          output_range: tuple[int, int], seed: int = 0,
                          vocab_range: tuple[int, int] = (0, 10000)
                          ) -> list[tuple[list[int], int]]:
    """W1: (prompt token ids, output length) pairs, lengths uniform in the inclusive ranges.

    Same draw order as /work/shared/tools/peers_gpu.py's `workload` (length, ids, output
    length per request, one Random(seed)), so seed 0 gives the published W1 requests.
    """
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = [rng.randint(*vocab_range) for _ in range(rng.randint(*input_range))]
        requests.append((prompt, rng.randint(*output_range)))
    return requests
