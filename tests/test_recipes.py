"""Recipe prompts and parsers on fixed teacher texts: well-formed, malformed, cut off by the token limit,
completion-style continuations and chat-style replies."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructflow.tasks import recipes
from instructflow.tasks.recipes import Demo, ParsedInstruction

SEEDS = [Demo(f"Seed task number {i}:", input=f"seed input {i}" if i % 2 else "", output=f"seed output {i}")
         for i in range(10)]
MACHINE = [Demo(f"Machine task number {i}") for i in range(5)]


def instructions(items: list[ParsedInstruction]) -> list[str]:
    return [item.instruction for item in items]


# --- decoding parameters -------------------------------------------------------------------------------

def test_decoding_parameters_match_the_references():
    assert recipes.SELF_INSTRUCT_DECODING == {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0,
                                              "max_tokens": 1024, "stop": ["\n\n", "\n16", "16.", "16 ."]}
    assert recipes.ALPACA_DECODING == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 3072, "stop": ["\n20", "20."]}
    assert recipes.CLASSIFY_DECODING["temperature"] == 0 and recipes.CLASSIFY_DECODING["max_tokens"] == 3
    assert recipes.INSTANCE_DECODING["temperature"] == 0 and recipes.INSTANCE_DECODING["presence_penalty"] == 1.5
    assert recipes.INSTANCE_DECODING["stop"] == ["Example 6", "Task:"]
    assert 300 <= recipes.INSTANCE_DECODING["max_tokens"] <= 350


# --- self-instruct ---------------------------------------------------------------------------------------

def test_sample_demos_takes_two_machine_and_six_seeds_deterministically():
    demos = recipes.sample_demos(SEEDS, MACHINE, random.Random(7))
    assert len(demos) == 8
    assert sum(d in MACHINE for d in demos) == 2 and sum(d in SEEDS for d in demos) == 6
    assert len({id(d) for d in demos}) == 8
    assert demos == recipes.sample_demos(SEEDS, MACHINE, random.Random(7))
    orders = {tuple(d.instruction for d in recipes.sample_demos(SEEDS, MACHINE, random.Random(s))) for s in range(20)}
    assert len(orders) > 1
    # shuffled: the machine demos are not always the first two
    positions = {i for s in range(20) for i, d in enumerate(recipes.sample_demos(SEEDS, MACHINE, random.Random(s)))
                 if d in MACHINE}
    assert positions - {0, 1}


def test_sample_demos_with_small_pools():
    only_seeds = recipes.sample_demos(SEEDS, [], random.Random(0))
    assert len(only_seeds) == 8 and all(d in SEEDS for d in only_seeds)
    assert len(recipes.sample_demos(SEEDS[:3], MACHINE, random.Random(0))) == 5      # 2 machine + all 3 seeds
    assert len(recipes.sample_demos(SEEDS, MACHINE[:1], random.Random(0))) == 8      # 1 machine + 7 seeds
    with pytest.raises(ValueError, match="both the seed and the machine pool are empty"):
        recipes.sample_demos([], [], random.Random(0))


def test_self_instruct_prompt_format():
    demos = [Demo("Give  three tips\nfor sleeping better:"), Demo("Translate the sentence into German.")]
    assert recipes.self_instruct_prompt(demos) == (
        "Come up with a series of tasks:\n1. Give three tips for sleeping better\n"
        "2. Translate the sentence into German.\n3.")
    with pytest.raises(ValueError):
        recipes.self_instruct_prompt([])


COMPLETION = (" Write a haiku about   autumn leaves.\n"
              "10. Explain the difference between weather and climate.\n"
              "11 . Name three\n   famous painters from Spain.\n"
              "12. \n"
              "13. Convert the sentence to passive voice.")


def test_parse_self_instruct_completion_continuation():
    items = recipes.parse_self_instruct(COMPLETION, n_demos=8, finish_reason="stop")
    assert instructions(items) == ["Write a haiku about autumn leaves.",
                                   "Explain the difference between weather and climate.",
                                   "Name three famous painters from Spain.",
                                   "Convert the sentence to passive voice."]
    assert not any(item.truncated for item in items)
    assert all(item.input == item.output == "" for item in items)


def test_parse_self_instruct_chat_reply_restating_the_number_after_a_preamble():
    text = "Sure! Here are more tasks:\n9. Write a haiku about autumn.\n10. Name three painters from Spain."
    assert instructions(recipes.parse_self_instruct(text, 8, "stop")) == [
        "Write a haiku about autumn.", "Name three painters from Spain."]
    restarted = "1. Write a haiku about autumn.\n2. Name three painters from Spain."
    assert instructions(recipes.parse_self_instruct(restarted, 8, "stop")) == [
        "Write a haiku about autumn.", "Name three painters from Spain."]


def test_parse_self_instruct_takes_an_item_quoted_whole_as_the_task_inside():
    text = ('9. "Tell whether the sentence is grammatically correct."\n'
            "10. \u201cName a fruit that is yellow.\u201d\n"
            '11. "Hello" is a greeting; translate "Hello" into French.\n'       # quotes inside: kept as written
            '12. "Summarize the text." and "Give it a title."\n'
            "13. \"\"")
    assert instructions(recipes.parse_self_instruct(text, 8, "stop")) == [
        "Tell whether the sentence is grammatically correct.", "Name a fruit that is yellow.",
        '"Hello" is a greeting; translate "Hello" into French.', '"Summarize the text." and "Give it a title."',
        '""']


def test_parse_self_instruct_truncation_policies():
    whole = recipes.parse_self_instruct(COMPLETION, 8, "length")   # self-instruct default: drop the response
    assert len(whole) == 4 and all(item.truncated for item in whole)
    last = recipes.parse_self_instruct(COMPLETION, 8, "length", truncation="drop_last")
    assert [item.truncated for item in last] == [False, False, False, True]
    assert [item.truncated for item in recipes.parse_self_instruct(COMPLETION, 8, None)] == [False] * 4
    with pytest.raises(ValueError, match="truncation must be one of drop_response, drop_last"):
        recipes.parse_self_instruct(COMPLETION, 8, "stop", truncation="keep")


def test_parse_self_instruct_junk():
    assert recipes.parse_self_instruct("", 8, "stop") == []
    assert recipes.parse_self_instruct("\n\n  \n", 8, "stop") == []
    assert instructions(recipes.parse_self_instruct("Just one rambling line", 8, "stop")) == ["Just one rambling line"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs"]), min_size=1).filter(
    lambda s: s.strip() and not s.strip()[0].isdigit()), min_size=1, max_size=7))
def test_parse_self_instruct_recovers_a_numbered_continuation(new):
    expected = [" ".join(s.split()) for s in new]
    text = " " + "\n".join(f"{9 + i}. {s}" if i else s for i, s in enumerate(expected))
    assert instructions(recipes.parse_self_instruct(text, 8, "stop")) == expected


# --- alpaca ----------------------------------------------------------------------------------------------

def test_alpaca_prompt_format():
    demos = [Demo("Rewrite the sentence formally:", input="gonna be late", output="I will be late."),
             Demo("Name a primary colour.", output="Red."),
             Demo("Add the numbers.", input="2, 3", output="5")]
    prompt = recipes.alpaca_prompt(demos, n_requested=20)
    assert "20" in prompt.split("###")[0] and "<noinput>" in prompt.split("###")[0]
    assert prompt.split("###", 1)[1] == (
        "\n1. Instruction: Rewrite the sentence formally\n1. Input:\ngonna be late\n1. Output:\nI will be late.\n"
        "###\n2. Instruction: Name a primary colour.\n2. Input:\n<noinput>\n2. Output:\nRed.\n"
        "###\n3. Instruction: Add the numbers.\n3. Input:\n2, 3\n3. Output:\n5\n"
        "###\n4. Instruction:")
    with pytest.raises(ValueError, match="must exceed"):
        recipes.alpaca_prompt(demos, n_requested=3)


ALPACA_COMPLETION = """ Suggest a title for the blog post.
4. Input:
A post about growing tomatoes on a small balcony.
4. Output:
Big Tomatoes, Small Balcony
###
5. Instruction: Name the largest planet in the solar system.
5. Input:
<noinput>
5. Output:
Jupiter.
###
6. Instruction: This block is missing its output.
6. Input:
<noinput>
###
8. Instruction: This block has the wrong number.
8. Input:
<noinput>
8. Output:
Skipped.
###
8. Instruction: List two primary colours.
8. Input:
<NoInput>
8. Output:
Red and blue.
###
9. Instruction: Translate the phrase into Spanish.
9. Input:
Good morning
9. Output:
Buenos"""


def test_parse_alpaca_completion_skips_malformed_blocks():
    items = recipes.parse_alpaca(ALPACA_COMPLETION, n_demos=3, finish_reason="stop")
    assert items == [
        ParsedInstruction("Suggest a title for the blog post.", "A post about growing tomatoes on a small balcony.",
                          "Big Tomatoes, Small Balcony"),
        ParsedInstruction("Name the largest planet in the solar system.", "", "Jupiter."),
        ParsedInstruction("List two primary colours.", "", "Red and blue."),
        ParsedInstruction("Translate the phrase into Spanish.", "Good morning", "Buenos"),
    ]


def test_parse_alpaca_truncation_policies():
    last = recipes.parse_alpaca(ALPACA_COMPLETION, 3, "length")   # alpaca default: drop only the last item
    assert [item.truncated for item in last] == [False, False, False, True]
    assert last[-1].output == "Buenos"
    whole = recipes.parse_alpaca(ALPACA_COMPLETION, 3, "length", truncation="drop_response")
    assert len(whole) == 4 and all(item.truncated for item in whole)
    # the cut-off last block is malformed: it was skipped anyway, so nothing earlier is flagged
    cut = ALPACA_COMPLETION.rsplit("9. Output:", 1)[0]
    assert [item.truncated for item in recipes.parse_alpaca(cut, 3, "length")] == [False, False, False]


def test_parse_alpaca_chat_reply():
    text = ("Here are the tasks you asked for:\n###\n4. Instruction: Give an antonym of 'cold'.\n4. Input:\n"
            "<noinput>\n4. Output:\nHot.\n###\n5. Instruction: Sort the words alphabetically.\n5. Input:\n"
            "pear, apple, fig\n5. Output:\napple, fig, pear\n")
    assert recipes.parse_alpaca(text, 3, "stop") == [
        ParsedInstruction("Give an antonym of 'cold'.", "", "Hot."),
        ParsedInstruction("Sort the words alphabetically.", "pear, apple, fig", "apple, fig, pear")]


def test_parse_alpaca_junk():
    assert recipes.parse_alpaca("", 3, "stop") == []
    assert recipes.parse_alpaca("I'm sorry, I can't help with that.", 3, "stop") == []
    assert recipes.parse_alpaca(" \n4. Input:\nx\n4. Output:\ny", 3, "stop") == []   # empty instruction


# --- classification ----------------------------------------------------------------------------------------

def test_classify_prompt():
    prompt = recipes.classify_prompt("Is the review  positive?\n")
    assert prompt.endswith("\n\nTask: Is the review positive?\nIs it classification?")
    assert 20 <= prompt.count("Is it classification?") - 1 <= 31
    assert "Is it classification? Yes" in prompt and "Is it classification? No" in prompt


@pytest.mark.parametrize("text, expected", [
    (" Yes", True), ("yes", True), ("YES", True), ("Yes.", True), ("Yes, it", True), ("**Yes**", True),
    (" No", False), ("no", False), ("", False), ("   ", False), ("Yeah", False), ("yEs", False),
    ("It is yes", False), ("Not sure", False),
])
def test_parse_classify(text, expected):
    assert recipes.parse_classify(text) is expected


# --- instances -------------------------------------------------------------------------------------------

def test_instance_prompts_pick_the_mode():
    output_first = recipes.instance_prompt("Classify the fruit as sweet or sour.", is_classification=True)
    input_first = recipes.instance_prompt("Write a limerick about a cat.", is_classification=False)
    assert output_first.endswith("Task: Classify the fruit as sweet or sour.\n") and "Class label:" in output_first
    assert input_first.endswith("Task: Write a limerick about a cat.\n") and "Example 1\nInput:" in input_first
    assert "Class label:" not in input_first


def test_parse_input_first_instances():
    text = ("Example 1\nInput: 3, 4\nOutput: 7\n"
            "Example 2\nInput: Null\nOutput: 0\n"
            "Example 3\nOutput: 10\n"
            "Example 4\nInput: 1, 1\nOutput: 2\nInput: 5, 5\nOutput: 10\n"
            "**Example 5**\n**Input:** 2, 2\n**Output:** 4\n")
    assert recipes.parse_instances(text, is_classification=False) == [
        ("3, 4", "7"), ("", "0"), ("", "10"), ("1, 1", "2"), ("2, 2", "4")]
    assert len(recipes.parse_instances(text, False, max_instances=2)) == 2


def test_parse_input_first_single_example_and_junk():
    assert recipes.parse_instances("Input: None\nOutput: A poem about rain.", False) == [("", "A poem about rain.")]
    assert recipes.parse_instances("I don't know how to do that.", False) == []
    assert recipes.parse_instances("", False) == []
    # "Example" inside a sentence does not start a new example
    text = "Example 1\nInput: x\nOutput: For Example, this."
    assert recipes.parse_instances(text, False) == [("x", "For Example, this.")]


def test_parse_output_first_instances():
    text = ("Class label: Positive\nInput: I loved every minute.\n"
            "Class label: Negative\nSentence: The food was cold.\n"
            "Class label: Neutral\n"
            "Class label: Positive\nInput: None\n")
    assert recipes.parse_instances(text, is_classification=True) == [
        ("I loved every minute.", "Positive"), ("The food was cold.", "Negative"), ("", "Neutral"), ("", "Positive")]
    assert recipes.parse_instances("Positive: great film", True) == []
    assert recipes.parse_instances("Example 1\nInput: x\nOutput: y", True) == []


def test_clean_instances_filters():
    pairs = [("same", "same"),          # input == output
             ("a question", ""),        # empty output
             ("Sentence:", "label"),    # cut-off input
             ("an input", "Answer:"),   # cut-off output
             ("2 + 2", "4"),
             ("2 + 2", "4"),            # exact duplicate
             ("", "A haiku."),
             ("", "Another haiku.")]    # empty inputs may have different outputs
    assert recipes.clean_instances(pairs) == [("2 + 2", "4"), ("", "A haiku."), ("", "Another haiku.")]
    assert recipes.clean_instances(pairs, max_instances=1) == [("2 + 2", "4")]


def test_clean_instances_drops_the_task_on_conflicting_outputs():
    assert recipes.clean_instances([("Is 7 prime?", "Yes"), ("Is 9 prime?", "No"), ("Is 7 prime?", "No")]) == []
    # a conflict only among invalid instances does not count
    assert recipes.clean_instances([("x", "y"), ("x", "x")]) == [("x", "y")]


def test_parse_then_clean_end_to_end():
    text = "Class label: Spam\nInput: WIN A PRIZE NOW\nClass label: Not spam\nInput: See you at lunch.\nClass label:"
    assert recipes.clean_instances(recipes.parse_instances(text, True)) == [
        ("WIN A PRIZE NOW", "Spam"), ("See you at lunch.", "Not spam")]


# --- chat-native instances (generate.instance_prompt = "chat") ------------------------------------------

def test_chat_instance_prompts_ask_for_the_input_then_send_the_task():
    asked = recipes.chat_input_prompt("Find the main verb in\nthe sentence.")
    assert "Find the main verb in the sentence." in asked and "write None" in asked
    assert recipes.chat_output_prompt("Find the main verb in the sentence.", " The cat sat. ") == \
        "Find the main verb in the sentence.\n\nThe cat sat."
    assert recipes.chat_output_prompt("Suggest a name for a bakery.", "") == "Suggest a name for a bakery."


@pytest.mark.parametrize("reply, expected", [
    ("The cat chased the mouse across the yard.", "The cat chased the mouse across the yard."),
    ('"I loved every minute of it."\n\nThis input is a review.', "I loved every minute of it."),
    ("Here is an example input:\n\n3, 17, 8, 12", "3, 17, 8, 12"),               # preamble line skipped
    ("**Input:** 25 C\n**Output:** 77 F", "25 C"),                              # labelled: up to Output:
    ("Task: Provide tips.\n\nInput: Studying for a test\nOutput: Sleep well.", "Studying for a test"),
    ("None", ""), ("None.", ""), ("N/A", ""), ("", ""), ("   \n\n ", ""),
    ("The task is to classify this sentence as a question or statement.", ""),  # talk about the task
    ("This task asks for a summary.", ""),
    ("I'm here to help you craft a grammatically correct sentence.", ""),       # the assistant talking
    ("The text, sentence, list or question the assistant would work on.", ""),  # the request echoed
])
def test_parse_chat_input(reply, expected):
    assert recipes.parse_chat_input(reply) == expected


def test_parse_chat_output_cuts_a_truncated_reply_at_its_last_sentence():
    assert recipes.parse_chat_output("  Set a schedule. Take breaks.  ", "stop") == "Set a schedule. Take breaks."
    assert recipes.parse_chat_output("Set a schedule. Take breaks. Also it is easy to get caught", "length") == \
        "Set a schedule. Take breaks."
    assert recipes.parse_chat_output("An answer with 3.5 in it and no end", "length") == ""
    assert recipes.parse_chat_output("Done!", "length") == "Done!"
    # what clean_instances then keeps: one instance, unless the output is empty or repeats the input
    assert recipes.clean_instances([("x", recipes.parse_chat_output("cut off", "length"))]) == []
    assert recipes.clean_instances([("", "The Daily Grind")]) == [("", "The Daily Grind")]
