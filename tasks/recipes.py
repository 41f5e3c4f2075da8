"""Generation recipes as pure logic: prompt strings for the teacher, and parsers for its replies.

Two recipes for new instructions:
- self-instruct (yizhongw/self-instruct): 8 demonstrations (up to 2 from the machine pool, the rest
  seeds) as a numbered list "Come up with a series of tasks:"; the teacher continues the list. A reply
  cut off by the token limit is dropped whole.
- alpaca (tatsu-lab/stanford_alpaca): a requirements preamble plus 3 seed demonstrations with input
  and output in a `###`-separated numbered format; the teacher writes ~16 more. A cut-off reply loses
  only its last item.

Self-instruct then makes instances for each kept instruction in two steps: a few-shot "is it
classification?" question, then output-first (classification: label, then an input for it) or
input-first ("Example 1 / Input / Output") instance generation, and the finetuning-prep filters.

Every prompt is a plain string: completion APIs get it as the prompt, chat APIs as one user message.
Parsers therefore accept both a pure continuation (completion) and a reply that restates the next
number itself, possibly after a one-line preamble (chat).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Demo:
    instruction: str
    input: str = ""
    output: str = ""
    is_classification: bool = False


@dataclass
class ParsedInstruction:
    instruction: str
    input: str = ""
    output: str = ""
    truncated: bool = False     # the teacher hit max_tokens and the truncation policy drops this item


TRUNCATION_POLICIES = ("drop_response", "drop_last")

# Decoding parameters of the references (OpenAI completion/chat argument names).
SELF_INSTRUCT_DECODING: dict = {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0, "max_tokens": 1024,
                                "stop": ["\n\n", "\n16", "16.", "16 ."]}
ALPACA_DECODING: dict = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 3072, "stop": ["\n20", "20."]}
CLASSIFY_DECODING: dict = {"temperature": 0.0, "max_tokens": 3, "stop": ["\n", "Task:"]}
INSTANCE_DECODING: dict = {"temperature": 0.0, "presence_penalty": 1.5, "max_tokens": 350,
                           "stop": ["Example 6", "Task:"]}

EMPTY_INPUTS = ("", "null", "none", "<noinput>")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'"}


def _unquoted(text: str) -> str:
    """An item wrapped whole in one pair of quotes, as small teachers write a list of tasks ("Tell whether
    the sentence is correct."), is the task inside; self-instruct's starts-with-punctuation filter would
    drop it (8 of 20 candidates of one cpu run). Quotes that open and close inside the item stay."""
    close = QUOTE_PAIRS.get(text[:1])
    if close and len(text) > 2 and text.endswith(close) and close not in text[1:-1] and text[:1] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def _demo_instruction(text: str) -> str:
    # As both references do: one line, no trailing colon (a colon invites the teacher to continue it).
    return _one_line(text).rstrip(":")


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {truncation!r}")


def _truncated_flags(n_items: int, finish_reason: str | None, truncation: str) -> list[bool]:
    """Which of n raw items the truncation policy drops when the reply was cut off."""
    if finish_reason != "length":
        return [False] * n_items
    if truncation == "drop_response":
        return [True] * n_items
    return [False] * (n_items - 1) + [True] * min(n_items, 1)


# --- self-instruct: instructions ---------------------------------------------------------------------

def sample_demos(seeds: Sequence[Demo], machine: Sequence[Demo], rng: random.Random, n_total: int = 8,
                 n_machine: int = 2) -> list[Demo]:
    """Up to `n_machine` machine-generated demos plus seeds up to `n_total`, shuffled (self-instruct's
    order of draws: machine sample, seed sample, shuffle). Fewer when the pools are small."""
    if n_total < 1 or n_machine < 0:
        raise ValueError(f"need n_total >= 1 and n_machine >= 0, got n_total={n_total}, n_machine={n_machine}")
    if not seeds and not machine:
        raise ValueError("no demonstrations to sample from: both the seed and the machine pool are empty")
    # rng.sample takes the sequences as they are: copying a 50K-entry pool per prompt would cost more than the prompt
    demos = rng.sample(machine, min(n_machine, n_total, len(machine)))
    demos += rng.sample(seeds, min(n_total - len(demos), len(seeds)))
    rng.shuffle(demos)
    return demos


def self_instruct_prompt(demos: Sequence[Demo]) -> str:
    if not demos:
        raise ValueError("self_instruct_prompt needs at least one demonstration")
    lines = ["Come up with a series of tasks:"]
    lines += [f"{i}. {_demo_instruction(d.instruction)}" for i, d in enumerate(demos, start=1)]
    return "\n".join(lines) + f"\n{len(demos) + 1}."


def parse_self_instruct(text: str, n_demos: int, finish_reason: str | None,
                        truncation: str = "drop_response") -> list[ParsedInstruction]:
    """The numbered items of a reply to `self_instruct_prompt`, in order, one line each.

    A completion continues right after the prompt's "{k+1}." so its first item has no number; a chat
    reply usually restates "{k+1}. ", and anything before that line is a preamble, not an item.
    Items the truncation policy drops are returned with truncated=True (the caller records why).
    """
    _check_truncation(truncation)
    restated = re.search(rf"(?m)^[ \t]*{n_demos + 1}\s?\. ", text)
    body = text[restated.end():] if restated else text
    # A leading "\n" lets the split also remove a number at the very start (a reply starting "1. ...").
    pieces = re.split(r"\n\d+\s?\. ", "\n" + body)
    flags = _truncated_flags(len(pieces), finish_reason, truncation)
    return [ParsedInstruction(instruction=_unquoted(_one_line(piece)), truncated=flag)
            for piece, flag in zip(pieces, flags) if _unquoted(_one_line(piece))]


# --- alpaca: instructions with input and output ---------------------------------------------------------

ALPACA_REQUIREMENTS = """\
You are writing a set of {n} varied tasks for training an AI assistant. Each task has an instruction, \
an optional input, and an output.

Requirements:
1. Use a different main verb in each instruction, so that the set stays varied.
2. Mix the kinds of task: open questions, rewriting, classification, brainstorming, extraction, \
summarizing, simple arithmetic, advice, and so on.
3. Write everything in English.
4. Keep each instruction to one or two sentences. It may be a question or a command.
5. A text-only assistant must be able to do every task: nothing that needs pictures, sound, files, \
web browsing or acting in the world.
6. Give an input only when the task needs something to work on (a sentence, a paragraph, a list, \
a question), with real content, not a placeholder. Otherwise write <noinput> as the input.
7. The output must be a correct and fitting answer to the instruction and input, under 100 words.

List of {n} tasks:
"""


def alpaca_prompt(demos: Sequence[Demo], n_requested: int = 20) -> str:
    if not demos:
        raise ValueError("alpaca_prompt needs at least one demonstration")
    if n_requested <= len(demos):
        raise ValueError(f"n_requested ({n_requested}) must exceed the number of demonstrations ({len(demos)})")
    prompt = ALPACA_REQUIREMENTS.format(n=n_requested)
    for i, d in enumerate(demos, start=1):
        prompt += (f"###\n{i}. Instruction: {_demo_instruction(d.instruction)}\n"
                   f"{i}. Input:\n{d.input.strip() or '<noinput>'}\n"
                   f"{i}. Output:\n{d.output.strip()}\n")
    return prompt + f"###\n{len(demos) + 1}. Instruction:"


def parse_alpaca(text: str, n_demos: int, finish_reason: str | None,
                 truncation: str = "drop_last") -> list[ParsedInstruction]:
    """The `###` blocks of a reply to `alpaca_prompt`. Block j must be numbered n_demos+1+j and have
    exactly the three fields Instruction, Input, Output in that order; other blocks are skipped."""
    _check_truncation(truncation)
    first = n_demos + 1
    head = f"{first}. Instruction:"
    restated = re.search(rf"(?m)^[ \t]*{first}\.\s+Instruction:", text)
    body = text[restated.start():] if restated else head + text  # a completion continues after the head
    blocks = body.split("###")
    flags = _truncated_flags(len(blocks), finish_reason, truncation)
    items = []
    for position, (block, flag) in enumerate(zip(blocks, flags)):
        parts = re.split(rf"{first + position}\.\s+(Instruction|Input|Output):", block)
        if len(parts) != 7 or parts[1::2] != ["Instruction", "Input", "Output"]:
            continue
        instruction, inst_input, output = _one_line(parts[2]), parts[4].strip(), parts[6].strip()
        if not instruction:
            continue
        if inst_input.lower() == "<noinput>":
            inst_input = ""
        items.append(ParsedInstruction(instruction=instruction, input=inst_input, output=output, truncated=flag))
    return items


# --- self-instruct: is it classification? -------------------------------------------------------------

CLASSIFY_EXAMPLES: tuple[tuple[str, bool], ...] = (
    ("Decide whether the customer review is positive or negative.", True),
    ("Write a short poem about the first snow of winter.", False),
    ("Is the following email spam? Answer yes or no.", True),
    ("Summarize the news article in two sentences.", False),
    ("Tell whether the statement is a fact or an opinion.", True),
    ("Suggest five names for a bakery that sells only bread.", False),
    ("Which language is this sentence written in: English, French, German or Spanish?", True),
    ("Translate the sentence into French.", False),
    ("Given a number, say whether it is prime.", True),
    ("Explain why the sky looks blue during the day.", False),
    ("Label the topic of the headline as sports, politics, business or science.", True),
    ("Rewrite the paragraph so that a ten-year-old can understand it.", False),
    ("Does the second sentence follow from the first? Answer entailment, contradiction or neutral.", True),
    ("List three pros and three cons of working from home.", False),
    ("Find the grammatical error in the sentence and correct it.", False),
    ("Is the given word a noun, a verb, an adjective or an adverb?", True),
    ("Compute the sum of the numbers in the list.", False),
    ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", True),
    ("Give me a recipe for a quick vegetarian dinner.", False),
    ("Decide if the two questions ask the same thing.", True),
    ("Answer the trivia question: who wrote Pride and Prejudice?", False),
    ("Rate the difficulty of the math problem as easy, medium or hard.", True),
    ("Extract all the dates mentioned in the text.", False),
    ("Does the tweet contain offensive language? Yes or no.", True),
    ("Write a polite reply declining the meeting invitation.", False),
)


def classify_prompt(instruction: str) -> str:
    prompt = ("Decide whether each task is a classification task: a task whose answer is one label from a "
              "small, fixed set of labels. Answer Yes or No.\n\n")
    for task, is_clf in CLASSIFY_EXAMPLES:
        prompt += f"Task: {task}\nIs it classification? {'Yes' if is_clf else 'No'}\n\n"
    return prompt + f"Task: {_one_line(instruction)}\nIs it classification?"


def parse_classify(text: str) -> bool:
    """Only an explicit Yes counts: the first word, stripped of punctuation/markdown, is Yes/yes/YES."""
    words = text.strip().split()
    return bool(words) and words[0].strip("*_`'\".,:;!") in ("Yes", "yes", "YES")


# --- self-instruct: instances -----------------------------------------------------------------------

INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. Give several examples when you can. "
                      "If a task needs no input, write \"Input: None\" and give the output.\n\n")
INPUT_FIRST_DEMOS = """\
Task: Convert the temperature from degrees Celsius to degrees Fahrenheit.
Example 1
Input: 25 C
Output: 77 F
Example 2
Input: -10 C
Output: 14 F
Example 3
Input: 100 C
Output: 212 F

Task: Suggest a name for a new coffee shop.
Example 1
Input: None
Output: The Daily Grind

Task: Find the largest number in the list.
Example 1
Input: [3, 17, 8, 12]
Output: 17
Example 2
Input: [-4, -9, -1]
Output: -1

Task: Summarize the paragraph in one sentence.
Example 1
Input: The town library will close for two weeks in March while workers replace the roof. Books can \
still be returned at the drop box, and the reading room reopens on April 1 with longer evening hours.
Output: The library closes for roof repairs in March and reopens on April 1 with longer evening hours.

"""

OUTPUT_FIRST_HEADER = ("Given a classification task, list its possible class labels and write an input for "
                       "each class label. If the task needs no input, just write the correct class label.\n\n")
OUTPUT_FIRST_DEMOS = """\
Task: Classify the sentiment of the movie review as positive or negative.
Class label: Positive
Input: A warm, funny film with a cast that clearly loved making it.
Class label: Negative
Input: Two hours of my life that I will never get back.

Task: Decide whether the email is spam.
Class label: Spam
Input: Congratulations! You have won a free cruise. Reply with your bank details to claim it.
Class label: Not spam
Input: Hi Sam, can we move tomorrow's meeting to 3 pm? Thanks, Priya

Task: Tell whether the statement is a fact or an opinion.
Class label: Fact
Input: Water boils at 100 degrees Celsius at sea level.
Class label: Opinion
Input: Summer is the best season of the year.

Task: Given a number, say whether it is prime.
Class label: Yes
Input: 13
Class label: No
Input: 21

"""


def instance_prompt(instruction: str, is_classification: bool) -> str:
    """Output-first for classification (so every label gets an input, not just the easy one),
    input-first otherwise."""
    if is_classification:
        return OUTPUT_FIRST_HEADER + OUTPUT_FIRST_DEMOS + f"Task: {_one_line(instruction)}\n"
    return INPUT_FIRST_HEADER + INPUT_FIRST_DEMOS + f"Task: {_one_line(instruction)}\n"


def _empty_if_null(text: str) -> str:
    text = text.strip()
    return "" if text.lower() in EMPTY_INPUTS else text


def _input_output(text: str) -> tuple[str, str]:
    """One input-first example: "Input: ...\nOutput: ..." (either part may be missing)."""
    output_mark = re.compile(r"Output\s*\d*\s*:")
    if output_mark.search(text):
        inst_input, inst_output = output_mark.split(text)[:2]   # a second "Output:" ends the first
    else:
        inst_input, inst_output = "", text
    inst_output = re.split(r"Input\s*\d*\s*:", inst_output)[0]   # a second pair glued on without "Example"
    inst_input = re.sub(r"^\s*Input\s*\d*\s*:", "", inst_input)
    return _empty_if_null(inst_input), inst_output.strip()


def parse_instances(text: str, is_classification: bool, max_instances: int = 5) -> list[tuple[str, str]]:
    """(input, output) pairs from a reply to `instance_prompt`, at most `max_instances`, unfiltered
    (see `clean_instances`). Junk without the expected markers gives []."""
    text = text.replace("**", "").strip()   # chat models like to bold the field names
    pairs: list[tuple[str, str]] = []
    if is_classification:
        if "Class label:" not in text:
            return []
        for chunk in text.split("Class label:")[1:]:
            label, _, rest = chunk.strip().partition("\n")
            inst_input = re.sub(r"^\s*(Input|Sentence)\s*\d*\s*:", "", rest)
            pairs.append((_empty_if_null(inst_input), label.strip()))
    else:
        example_mark = re.compile(r"(?m)^[ \t]*Example[ \t]*\d*[ \t]*[.:]?")
        if example_mark.search(text):
            chunks = [c.strip() for c in example_mark.split(text) if c.strip()]
        elif re.search(r"Output\s*\d*\s*:", text):
            chunks = [text]     # a single example without the "Example 1" line
        else:
            return []
        pairs = [_input_output(chunk) for chunk in chunks]
    return pairs[:max_instances]


def clean_instances(pairs: Sequence[tuple[str, str]], max_instances: int = 5) -> list[tuple[str, str]]:
    """Self-instruct's finetuning-prep filters. Drops an instance whose input equals its output, whose
    output is empty, or whose input/output ends with ":" (usually a cut-off generation); drops the whole
    task (returns []) when two instances share a non-empty input but differ in output; removes exact
    duplicates; keeps the first `max_instances`."""
    valid = [(i.strip(), o.strip()) for i, o in pairs]
    valid = [(i, o) for i, o in valid if i != o and o and not i.endswith(":") and not o.endswith(":")]
    output_of: dict[str, str] = {}
    for inst_input, output in valid:
        if inst_input and output_of.setdefault(inst_input, output) != output:
            return []
    return list(dict.fromkeys(valid))[:max_instances]


# --- chat-native instances (generate.instance_prompt = "chat") -------------------------------------
# A small chat teacher (the embedded SmolLM2-135M) rarely writes the few-shot "Input:/Output:" format
# above, so almost no instruction got an instance. It can follow a plain chat request, so here one
# instance takes two requests: "write an input for this task", then the task itself (instruction +
# that input) as the user message, whose reply is the output. No classification step.

CHAT_INPUT_DECODING: dict = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64}
CHAT_OUTPUT_DECODING: dict = {"temperature": 0.3, "top_p": 0.9, "max_tokens": 256}

_NO_INPUT_REPLIES = ("none", "none.", "no input", "no input.", "n/a", "<noinput>", "null")
# replies that talk about the task (or as the assistant) instead of giving an input to it, or echo the request
_META_REPLY = re.compile(r"^(the|this) (task|ai|assistant|input)\b|^(task|here is|here's|sure|certainly|of course|"
                         r"i'm|i am|i can|i will|i'd|as an ai)\b|would work on", re.IGNORECASE)


def chat_input_prompt(instruction: str) -> str:
    return (f"Here is a task for an AI assistant:\n\n{_one_line(instruction)}\n\n"
            "Write one example input for this task: the text, sentence, list or question the assistant "
            "would work on. Write only the input itself. If the task needs no input, write None.")


def parse_chat_input(text: str) -> str:
    """The input in a reply to `chat_input_prompt`; "" when the task needs none (or the reply gives
    none). Takes what follows an "Input:" label when there is one (up to an "Output:" label), else the
    first paragraph that is not a preamble ("Here is an example input:") or talk about the task."""
    text = text.replace("**", "").strip()
    labelled = re.search(r"(?im)^[ \t]*(?:example )?input\s*:[ \t]*", text)
    if labelled:
        text = re.split(r"(?im)^[ \t]*output\s*:", text[labelled.end():])[0]
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip().strip('"').strip()
        if not paragraph or paragraph.endswith(":"):
            continue
        if paragraph.lower() in _NO_INPUT_REPLIES or _META_REPLY.search(paragraph.split(". ")[0]):
            return ""
        return paragraph
    return ""


def chat_output_prompt(instruction: str, inst_input: str) -> str:
    """The task as a user would send it: the instruction, then its input (if any) after a blank line."""
    return _one_line(instruction) + (f"\n\n{inst_input.strip()}" if inst_input.strip() else "")


def parse_chat_output(text: str, finish_reason: str | None) -> str:
    """The output in a reply to `chat_output_prompt`: the reply itself, stripped; a reply cut off by
    the token limit ends at its last complete sentence (and is "" when it has none), so SFT never
    learns to stop mid-word."""
    text = text.strip()
    if finish_reason == "length":
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        text = text[:ends[-1]] if ends else ""
    return text.strip()
