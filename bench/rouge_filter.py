"""Benchmark: our ROUGE-L near-duplicate filter vs the stanford_alpaca reference method.

    python bench/rouge_filter.py [--corpus PATH] [--limit N] [--reference-limit M] [--decisions-out PATH]

Filters a stream (JSONL objects with an "instruction" field, in arrival order; default: a built-in
deterministic ~52K instruction-like stream) with NearDuplicateFilter, then filters the first M items
the reference way in the same process: rouge_score's tokenizer once per item, then
`rouge_scorer._score_lcs` of each candidate against the whole current pool, reject if max > 0.7,
greedy. The reference runs in a single process (the honest per-pair cost; stanford_alpaca spreads
the same pairs over a process pool). Verdicts and max scores must be identical on those M items.

The last line printed is one JSON object:
  n, kept, ours_s                 stream size, items kept, our seconds for the whole stream
  reference_n, reference_s        items filtered the reference way, its seconds
  identical                       verdicts and max scores equal on those items (most_similar_identical:
                                  the most similar entry too)
  ratio_at_reference_n            reference_s / our seconds for the same first M items
  reference_pairs_per_s           pairs the reference scored / reference_s
  projected_reference_s_full      pairs the reference would score on the whole stream (sum over items
                                  of the pool size before each) / reference_pairs_per_s
  projected_ratio_full            projected_reference_s_full / ours_s
  incremental_s                   seconds to offer 1000 new items to a pool of incremental_pool items
                                  loaded with add() (only for streams of >= 2000 items)
  peak_rss_mb                     peak resident memory of this process
Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rouge_score import rouge_scorer, tokenizers

from instructflow.tasks.rouge import NearDuplicateFilter

THRESHOLD = 0.7

# ------------------------------------------------------------------------- built-in realistic stream

ADJECTIVES = """short long funny sad creative simple detailed formal informal persuasive romantic scary
mysterious inspiring humorous concise brief thoughtful catchy memorable professional friendly polite
rude angry happy gloomy colorful vivid modern ancient futuristic rural urban healthy cheap expensive
elegant rustic minimalist quirky witty clever silly serious dramatic poetic technical historical
fictional realistic magical peaceful noisy quiet bright dark warm cold spicy sweet bitter fresh
sustainable digital local global personal private public academic casual vintage""".split()
NOUNS = """dog cat ocean mountain river city village forest desert robot computer phone garden kitchen
school teacher student doctor nurse farmer artist musician painter writer friend neighbor family
child grandmother bicycle car train airplane ship rocket planet star moon sun cloud storm rain
snow winter summer spring autumn coffee tea bread cheese apple banana chocolate pizza soup salad
book library museum park bridge castle island beach lake volcano river election economy market
company startup team meeting project deadline budget website app algorithm database network
password email letter resume interview job career hobby sport football tennis chess music song
movie painting photograph camera festival holiday birthday wedding vacation hotel restaurant""".split()
PLURALS = """animals fruits vegetables countries cities books movies songs tools habits hobbies exercises
recipes games toys websites apps languages inventions scientists artists colors shapes emotions
careers sports plants birds insects planets metals gemstones instruments holidays desserts drinks
snacks strategies mistakes benefits risks questions ideas features products services""".split()
TOPICS = """climate change, artificial intelligence, the water cycle, photosynthesis, the french revolution,
machine learning, social media, remote work, renewable energy, the stock market, quantum computing,
ancient rome, the human brain, healthy eating, time management, public speaking, online privacy,
space exploration, the immune system, electric cars, global warming, the internet, democracy,
recycling, meditation, the roman empire, black holes, the industrial revolution, cryptocurrency,
blockchain technology, video games, urban gardening, ocean pollution, the olympic games, jazz music,
world war ii, the solar system, gene editing, self driving cars, the printing press, volcanoes,
coral reefs, minimalism, mental health, financial literacy, the great wall of china, climate policy,
3d printing, smart homes, the theory of evolution, plate tectonics, the renaissance, sleep hygiene,
caffeine, the gig economy, virtual reality, bees and pollination, the moon landing, inflation""".split(",")
VERBS = """improve learn explain describe organize plan reduce increase save protect build design clean
cook fix write read teach train measure compare analyze predict choose avoid prepare celebrate
manage start finish test translate summarize classify rank sort calculate estimate convince""".split()
AUDIENCES = """a five year old, a high school student, a beginner, an expert, my grandmother, a busy parent,
a software engineer, a new employee, a tourist, a group of investors, a college freshman, a retiree,
a small business owner, a nurse, a teenager""".split(",")
FORMS = """poem story essay haiku limerick tweet blog post speech song slogan joke riddle dialogue
letter email review advertisement headline paragraph summary recipe""".split()
LANGUAGES = "French Spanish German Italian Japanese Chinese Portuguese Russian Korean Arabic Hindi Dutch".split()
NAMES = "Alice Bob Maria Chen Priya Omar Lucas Emma Noah Sofia Diego Yuki Fatima Liam Zoe".split()
PLACES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Toronto", "Sydney", "Mumbai", "Nairobi", "Berlin", "Seoul",
          "Mexico City", "Lisbon", "New York", "Cape Town", "Reykjavik", "Buenos Aires", "Hanoi"]
UNICODE_BITS = ["café", "naïve", "résumé", "jalapeño", "Zürich", "São Paulo", "crème brûlée", "über",
                "façade", "coöperate", "fiancée", "piñata", "smörgåsbord", "😀", "→", "—"]
CJK_LINES = ["写一首关于秋天的诗。", "解释一下光合作用。", "日本の首都はどこですか？", "请列出五种水果。",
             "한국어로 인사말을 쓰세요.", "翻译下面的句子。"]

TEMPLATES = [
    "Write a {adj} {form} about {topic}.",
    "Write a {adj} {form} about a {noun} who wants to {verb} a {noun2}.",
    "Explain {topic} to {audience}.",
    "Explain how {topic} affects {plural} in {place}.",
    "Give me {num} tips to {verb} my {noun}.",
    "Give {num} examples of {adj} {plural}.",
    "What are the main differences between a {noun} and a {noun2}?",
    "What is the best way to {verb} a {adj} {noun}?",
    "Classify the following {plural} as {adj} or {adj2}: {noun}, {noun2}, {noun3}.",
    "Rewrite the following sentence in a {adj} tone: {sentence}",
    "Summarize the following paragraph in {num} sentences. {paragraph}",
    "Generate a list of {num} {adj} {plural} for a {noun} themed party.",
    "Translate \"{sentence}\" into {language}.",
    "Create a {num}-day plan for {audience} who wants to {verb} {topic}.",
    "How can I {verb} my {noun} without spending too much money?",
    "Describe the {noun} of your dreams using {adj} language.",
    "Find the {math} of {n1} and {n2}.",
    "Calculate the {math} of {n1}, {n2} and {n3}.",
    "Suggest a {adj} name for a {noun} shop in {place}.",
    "Compose an email to {name} asking about the {noun} {when}.",
    "Identify the {grammar} in the sentence: {sentence}",
    "Is the following statement true or false? {sentence}",
    "Pretend you are a {noun}. Describe a day in your life in {place}.",
    "List {num} reasons why {topic} matters for {audience}.",
    "Come up with a {adj} question about {topic} and answer it.",
    "Edit the following text to make it more {adj}: {sentence}",
    "Compare {topic} and {topic2} in a short table.",
    "Write a dialogue between {name} and {name2} about {topic}.",
    "Provide a {adj} definition of {topic} in one sentence.",
    "Recommend {num} {plural} that {audience} would enjoy, and explain why.",
    "Convert {n1} {unit} to {unit2}.",
    "Sort these {plural} from {adj} to {adj2}: {noun}, {noun2}, {noun3}, {noun4}.",
    "Design a {adj} logo idea for a {noun} company called {name}'s {noun2}.",
    "Outline the steps to {verb} a {noun} for the first time.",
    "Tell me a {adj} fact about {topic}.",
    "Why do {plural} {verb} {plural2} in {season}?",
    "Brainstorm {num} {adj} ideas for a {form} about {topic}.",
    "Analyze the pros and cons of {topic} for a {noun} in {place}.",
    "Draft a {adj} {form} announcing our new {noun} in {place}.",
    "Predict what will happen to {topic} in the next {num} years.",
]
SUFFIXES = ["", "", "", "", "", "", "", "", "", " Keep it under {num} words.", " Use simple language.",
            " Include an example.", " Explain your reasoning.", " Be {adj}.", " Answer in {language}.", " Use bullet points.",
            " Make it suitable for {audience}."]
PREFIXES = ["", "", "", "", "", "", "", "", "Please ", "Can you ", "I need you to ", "Quickly ", "Now "]
SYNONYMS = {"write": "compose", "compose": "write", "give": "provide", "provide": "give", "explain": "describe",
            "describe": "explain", "list": "enumerate", "short": "brief", "brief": "short", "tips": "suggestions",
            "create": "generate", "generate": "create", "best": "easiest", "main": "key", "ideas": "suggestions",
            "reasons": "arguments", "funny": "humorous", "happy": "joyful", "big": "large", "make": "create",
            "following": "given", "plan": "schedule", "simple": "plain", "find": "compute"}
MATH = ["sum", "product", "difference", "average", "greatest common divisor", "least common multiple"]
GRAMMAR = ["verb", "subject", "adjectives", "nouns", "main clause", "passive voice", "tense"]
UNITS = ["miles", "kilometers", "pounds", "kilograms", "celsius", "fahrenheit", "inches", "liters"]
SEASONS = ["winter", "summer", "spring", "autumn", "the rainy season"]
WHEN = ["next week", "tomorrow", "on Friday", "this month", "before the deadline"]


def _rare_words(count: int, seed: int) -> list[str]:
    """Made-up names and terms (products, species, places...): the long tail of real vocabularies."""
    rng = random.Random(seed)
    syllables = [c + v for c in "b c d f g h j k l m n p r s t v w z br st tr pl ch sh th kr".split() for v in "aeiou"]
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)}
    return sorted(words)


RARE = _rare_words(30_000, seed=1)


def _rare(rng: random.Random) -> str:
    """Zipf-like pick: a few made-up terms recur often, most appear once or twice."""
    return RARE[int(len(RARE) ** rng.random()) - 1]   # log-uniform index


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)}s the {rng.choice(NOUNS)} "
            f"{rng.choice(['in', 'near', 'with', 'for', 'under', 'after'])} the {rng.choice(NOUNS)}.")


def _noun(rng: random.Random) -> str:
    return _rare(rng) if rng.random() < 0.3 else rng.choice(NOUNS)


def _topic(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.25:
        return f"the {_rare(rng)} {rng.choice(NOUNS)}"
    if roll < 0.4:
        return f"{_rare(rng).capitalize()} {rng.choice(PLURALS)}"
    if roll < 0.5:
        return f"the history of {_rare(rng).capitalize()}"
    return rng.choice(TOPICS).strip()


def _fill(template: str, rng: random.Random) -> str:
    slots = {
        "adj": rng.choice(ADJECTIVES), "adj2": rng.choice(ADJECTIVES), "form": rng.choice(FORMS),
        "topic": _topic(rng), "topic2": _topic(rng), "noun": _noun(rng),
        "noun2": _noun(rng), "noun3": _noun(rng), "noun4": _noun(rng),
        "verb": rng.choice(VERBS), "plural": rng.choice(PLURALS), "plural2": rng.choice(PLURALS),
        "audience": rng.choice(AUDIENCES).strip(), "place": rng.choice(PLACES),
        "name": rng.choice(NAMES + [_rare(rng).capitalize()]), "name2": rng.choice(NAMES), "language": rng.choice(LANGUAGES), "math": rng.choice(MATH),
        "grammar": rng.choice(GRAMMAR), "unit": rng.choice(UNITS), "unit2": rng.choice(UNITS),
        "season": rng.choice(SEASONS), "when": rng.choice(WHEN), "num": str(rng.randint(2, 12)),
        "n1": str(rng.randint(1, 999)), "n2": str(rng.randint(1, 999)), "n3": str(rng.randint(1, 99)),
        "sentence": _sentence(rng),
        "paragraph": " ".join(_sentence(rng) for _ in range(rng.choice([2, 3, 4, 6, 10, 14]))),
    }
    return template.format(**slots)


IMPERATIVES = """write describe explain list create design suggest compare evaluate outline draft propose
summarize invent imagine identify recommend analyze plan critique rewrite name estimate sketch argue""".split()
DETERMINERS = ["a", "the", "an unusual", "my", "our", "their", "one", "every", "some", "this"]
PREPOSITIONS = ["for", "about", "with", "without", "near", "during", "after", "before", "against", "like",
                "inside", "beyond", "across", "despite", "between two"]
CONTEXTS = ["for my {noun} class", "as if you were {name}", "focusing on {topic}", "in the style of {name}",
            "for a {adj} {noun} blog", "considering {topic}", "for readers in {place}",
            "from the point of view of a {noun}", "using only {num} words", "for a {noun} newsletter",
            "set in {place}", "with a twist ending", "for a podcast about {topic}", "without mentioning {plural}"]


def _free_form(rng: random.Random) -> str:
    """A random imperative: verb, noun phrase, one to three prepositional phrases."""
    def noun_phrase() -> str:
        return " ".join(w for w in (rng.choice(DETERMINERS), rng.choice(ADJECTIVES) if rng.random() < 0.6 else "",
                                    _noun(rng)) if w)
    parts = [rng.choice(IMPERATIVES), noun_phrase()]
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice(PREPOSITIONS), noun_phrase() if rng.random() < 0.6 else _topic(rng)]
    return " ".join(parts) + rng.choice([".", "?", "!", "."])


def _fresh(rng: random.Random) -> str:
    task = _free_form(rng) if rng.random() < 0.55 else _fill(rng.choice(TEMPLATES), rng)
    if rng.random() < 0.4:
        task = task[:-1] + " " + _fill(rng.choice(CONTEXTS), rng) + task[-1]
    text = (rng.choice(PREFIXES) + task + _fill(rng.choice(SUFFIXES), rng)).strip()
    if rng.random() < 0.05:   # Unicode quirks: accents and emoji (rouge-score drops the non-ASCII letters)
        words = text.split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(UNICODE_BITS))
        text = " ".join(words)
    return text[0].upper() + text[1:]


def _perturb(text: str, rng: random.Random) -> str:
    """1-4 word-level edits: adjacent swap, insertion, deletion, synonym change."""
    words = text.split()
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        edit = rng.choice(["swap", "insert", "delete", "synonym", "synonym"])
        i = rng.randrange(len(words))
        if edit == "swap" and len(words) > 1:
            j = min(i + 1, len(words) - 1) if i + 1 < len(words) else i - 1
            words[i], words[j] = words[j], words[i]
        elif edit == "insert":
            words.insert(i, rng.choice(ADJECTIVES + NOUNS + ["really", "also", "the", "a", "very", "please"]))
        elif edit == "delete" and len(words) > 3:
            del words[i]
        else:
            candidates = [k for k, w in enumerate(words) if w.lower().strip(".,?!:") in SYNONYMS]
            if candidates:
                k = rng.choice(candidates)
                words[k] = SYNONYMS[words[k].lower().strip(".,?!:")]
    return " ".join(words)


def builtin_stream(n: int = 52_000, seed: int = 0) -> list[str]:
    """Deterministic instruction-like stream: template fills and free-form imperatives, 20% perturbed
    copies of one of the last 5000 items (most of them near duplicates), a few CJK lines (no rouge
    tokens at all). The first k items do not depend on n."""
    rng = random.Random(seed)
    stream: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if stream and roll < 0.2:
            stream.append(_perturb(stream[rng.randrange(max(0, len(stream) - 5000), len(stream))], rng))
        elif roll < 0.203:
            stream.append(rng.choice(CJK_LINES))
        else:
            stream.append(_fresh(rng))
    return stream


def read_corpus(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no}: invalid JSON ({e.msg})")
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
                raise SystemExit(f"{path}:{line_no}: expected an object with a string field 'instruction'")
            texts.append(record["instruction"])
    return texts

# ---------------------------------------------------------------------------------------- the runs


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def run_ours(texts: list[str], checkpoint: int, top_k: int) -> tuple[list, float, float]:
    """(verdicts, total seconds, seconds after the first `checkpoint` items)."""
    near_dup = NearDuplicateFilter(threshold=THRESHOLD, top_k=top_k)
    verdicts = []
    at_checkpoint = 0.0
    elapsed = 0.0
    with _progress() as progress:
        bar = progress.add_task("ours", total=len(texts))
        for start in range(0, len(texts), 500):   # time only the filter, not the progress bar
            t0 = time.perf_counter()
            for index in range(start, min(start + 500, len(texts))):
                verdicts.append(near_dup.offer(index, texts[index]))
                if index + 1 == checkpoint:
                    at_checkpoint = elapsed + time.perf_counter() - t0
            elapsed += time.perf_counter() - t0
            progress.update(bar, completed=len(verdicts))
    return verdicts, elapsed, at_checkpoint


def run_reference(texts: list[str]) -> tuple[list[tuple[bool, float, int | None]], float, int]:
    """stanford_alpaca's method in one process: (kept, max score, first argmax) per item, seconds, pairs."""
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    results, pool, pool_index, pairs = [], [], [], 0
    with _progress() as progress:
        bar = progress.add_task("reference", total=len(texts))
        t0 = time.perf_counter()
        for index, text in enumerate(texts):
            tokens = tokenizer.tokenize(text)
            scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in pool]
            pairs += len(pool)
            best = max(scores, default=0.0)
            kept = best <= THRESHOLD
            results.append((kept, best, pool_index[scores.index(best)] if best > 0 else None))
            if kept:
                pool.append(tokens)
                pool_index.append(index)
            if index % 50 == 0:
                progress.update(bar, completed=index + 1)
        seconds = time.perf_counter() - t0
        progress.update(bar, completed=len(texts))
    return results, seconds, pairs


def time_incremental(texts: list[str], pool_size: int, new: int, top_k: int) -> float:
    """Seconds to offer `new` candidates to a filter whose pool of `pool_size` was built with add()."""
    near_dup = NearDuplicateFilter(threshold=THRESHOLD, top_k=top_k)
    for index in range(pool_size):
        near_dup.add(index, texts[index])
    t0 = time.perf_counter()
    near_dup.offer_many((index, texts[index]) for index in range(pool_size, pool_size + new))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="JSONL with an 'instruction' field (default: built-in stream)")
    parser.add_argument("--limit", type=int, help="use only the first N items")
    parser.add_argument("--reference-limit", type=int, default=2000, help="items filtered the reference way")
    parser.add_argument("--decisions-out", type=Path, help="write one JSON line per item")
    parser.add_argument("--top-k", type=int, default=10, help="top-k kept per verdict by our filter (0: fast path)")
    args = parser.parse_args(argv)

    for name in ("limit", "reference_limit", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    texts = read_corpus(args.corpus) if args.corpus else builtin_stream(52_000 if args.limit is None else args.limit)
    if args.limit is not None:
        texts = texts[:args.limit]
    reference_n = min(args.reference_limit, len(texts))

    verdicts, ours_s, ours_at_reference_n = run_ours(texts, reference_n, args.top_k)
    kept_before, pairs_full = 0, 0          # the reference's pairs on the full stream: pool size before each
    for verdict in verdicts:
        pairs_full += kept_before
        kept_before += verdict.kept

    reference, reference_s, reference_pairs = run_reference(texts[:reference_n])
    identical = all(v.kept == kept and v.max_score == best for v, (kept, best, _) in zip(verdicts, reference))
    same_most_similar = all(v.most_similar_id == most for v, (_, _, most) in zip(verdicts, reference))

    if args.decisions_out:
        with open(args.decisions_out, "w") as f:
            for index, verdict in enumerate(verdicts):
                f.write(json.dumps({"index": index, "kept": verdict.kept, "max_score": verdict.max_score,
                                    "most_similar_index": verdict.most_similar_id}) + "\n")

    incremental = {}
    if len(texts) >= 2000:
        pool_size = min(50_000, len(texts) - 1000)
        incremental = {"incremental_pool": pool_size, "incremental_new": 1000,
                       "incremental_s": round(time_incremental(texts, pool_size, 1000, args.top_k), 3)}

    # Projection: the reference's cost is per pair, so its full-stream time = pairs / measured rate.
    pairs_per_s = reference_pairs / reference_s if reference_pairs else None   # None: nothing to measure
    projected = pairs_full / pairs_per_s if pairs_per_s else None
    result = {
        "n": len(texts), "kept": sum(v.kept for v in verdicts), "ours_s": round(ours_s, 3),
        "reference_n": reference_n, "reference_s": round(reference_s, 3), "identical": identical,
        "ratio_at_reference_n": round(reference_s / ours_at_reference_n, 1) if ours_at_reference_n else None,
        "reference_pairs_per_s": round(pairs_per_s, 1) if pairs_per_s else None,
        "projected_reference_s_full": round(projected, 1) if projected is not None else None,
        "projected_ratio_full": round(projected / ours_s, 1) if projected is not None and ours_s > 0 else None,
        "reference_mode": "single process; rouge-score tokenizer once per item, rouge_scorer._score_lcs per pair",
        "most_similar_identical": same_most_similar, "top_k": args.top_k, "pairs_full": pairs_full,
        **incremental, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
