"""The augmentation prompt types, as data: one entry per type.

Each type has a chat version (system + user message, for instruct models) and a plain-completion
version (a document followed by a heading the model continues, for base models). Both are fed only
the document's title and text. SPA's seven types are on by default; others (closed-book "qa") are
selected with `augment.types`. Adding a type is adding one entry to PROMPT_TYPES.
"""
from __future__ import annotations

from dataclasses import dataclass

from kinject.core.files import sha256_text

SYSTEM = (
    "You rewrite documents for study. Use only the facts in the document. Keep its names, "
    "numbers and dates exactly as written. Do not invent facts, numbers or names."
)


@dataclass(frozen=True)
class PromptType:
    id: str
    description: str
    instruction: str  # the chat user message; {title} and {text} are filled in
    heading: str  # the plain-completion version: the document, then this heading line
    lead: str = ""  # completion style: the first words of the answer, written for the model
    default: bool = True  # part of the default set (SPA's seven)
    rule: bool = False  # cut from the document by rule (augment/extract.py), no generator
    variant_of: str = ""  # a rubric variant: the type it adds one line of guidance to

    def chat(self, title: str, text: str) -> list[dict]:
        user = f"Title: {title}\n\n{text}\n\n{self.instruction.format(title=title)}"
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def completion(self, title: str, text: str) -> str:
        return f"Title: {title}\n\n{text}\n\n{self.heading.format(title=title)}\n{self.lead}"

    def prompt_id(self, style: str) -> str:
        """Names the exact prompt text: changes when the wording or the style changes. A rule
        type has no prompt; its id names the version of its rule instead."""
        if self.rule:
            from kinject.augment.extract import RULES_VERSION

            return f"{self.id}/rule@{RULES_VERSION}"
        body = SYSTEM + self.instruction if style == "chat" else self.heading + "\n" + self.lead
        return f"{self.id}/{style}@{sha256_text(body)[:8]}"


# The stop strings every completion-style prompt gets: a base model tends to start a new document.
COMPLETION_STOP = ("\nTitle:", "\n\n\n")

PROMPT_TYPES: dict[str, PromptType] = {
    t.id: t
    for t in (
        PromptType(
            "key_concepts",
            "the key concepts one by one, each explained with its entities and facts",
            "List the key concepts of the document about {title} one by one. Explain each concept "
            "with the people, places, organisations, numbers and dates the document gives for it.",
            "Key concepts of \"{title}\", each explained with the names, numbers and dates above:",
        ),
        PromptType(
            "mind_map",
            "the key concepts and how they relate, naming the entities",
            "Write a mind map of the document about {title}: its central topic, the key concepts "
            "around it, and how each concept relates to the others. Name the entities involved.",
            "Mind map of \"{title}\" (central topic, key concepts, and how they relate):",
        ),
        PromptType(
            "implications",
            "what follows directly or indirectly from the text",
            "What are the implications of the document about {title}? Explain what follows directly "
            "and indirectly from its facts, and name the facts each implication rests on.",
            "Implications of \"{title}\", direct and indirect, with the facts they rest on:",
        ),
        PromptType(
            "critical_qa",
            "question/answer pairs that compare, justify and ask what if; no bare recall",
            "Write question and answer pairs about the document on {title} that need thinking: "
            "compare facts, ask why, ask what would change if something were different. "
            "Answer each question using the document. Format: Q: ... A: ...",
            "Questions that compare, justify and ask \"what if\" about \"{title}\", each answered from the text:",
            lead="Q:",
        ),
        PromptType(
            "case_study",
            "a formal case study that keeps the title and every key detail",
            "Write a formal case study titled \"{title}\" based on the document. Keep every key "
            "detail: the names, places, numbers and dates.",
            "Case study: {title}",
            lead="Background:",
        ),
        PromptType(
            "discussion",
            "a grounded dialogue between two people about the text",
            "Write a dialogue between two people, Alex and Sam, discussing the document about "
            "{title}. They should mention its specific facts, names and numbers.",
            "A conversation between Alex and Sam about \"{title}\":",
            lead="Alex:",
        ),
        PromptType(
            "teacher",
            "a step-by-step explanation for a first-time reader",
            "You are a teacher. Explain the document about {title} step by step to a student who "
            "reads about it for the first time. Go through each fact in order.",
            "A teacher explains \"{title}\" step by step to a student reading about it for the first time:",
            lead="Step 1:",
        ),
        PromptType(
            "qa",
            "closed-book question/answer pairs in the style of users' questions",
            "Write short questions a person might ask about {title}, each followed by its answer "
            "taken from the document. Ask about names, numbers, dates and places. "
            "Format: Q: ... A: ...",
            "Questions people ask about \"{title}\", each with its short answer from the text:",
            lead="Q:",
            default=False,
        ),
        # Fact-level types cut from the text by rule: every output is checkable against its
        # sentence, so they teach facts even where the generator would invent them.
        PromptType(
            "fact_qa",
            "a question for every name, number and date of each sentence, answered by that span (rule)",
            "",
            "",
            default=False,
            rule=True,
        ),
        PromptType(
            "entity_qa",
            "a question about each name of a document, answered by the sentences that mention it (rule)",
            "",
            "",
            default=False,
            rule=True,
        ),
        PromptType(
            "yes_no",
            "whether each sentence's claim holds, as written (yes) or with one fact swapped for another of the document's (no) (rule)",
            "",
            "",
            default=False,
            rule=True,
        ),
        PromptType(
            "restate",
            "each sentence standing alone with its subject named, in a new order (rule)",
            "",
            "",
            default=False,
            rule=True,
        ),
    )
}

# Rubric variants: a generated type with one more line of guidance, named `type+rubric`. The
# generation bandit (influence.guide) shifts the budget towards the variants whose samples score
# highest; they can also be named in augment.types like any type.
RUBRICS: dict[str, tuple[str, str]] = {
    # name: (the line added to the chat instruction, the words added to the completion heading)
    "facts": (
        "Every sentence must state one fact of the document with its exact names, numbers and dates.",
        "(one fact per sentence, with its exact names, numbers and dates)",
    ),
    "brief": (
        "Keep every item short: one or two sentences, each answerable from the document.",
        "(short items, each answerable from the text)",
    ),
}


def _variant(base: PromptType, name: str) -> PromptType:
    chat_line, heading_words = RUBRICS[name]
    return PromptType(
        f"{base.id}+{name}",
        f"{base.description}; rubric: {name}",
        f"{base.instruction} {chat_line}",
        f"{base.heading} {heading_words}",
        lead=base.lead,
        default=False,
        variant_of=base.id,
    )


PROMPT_TYPES.update({v.id: v for t in list(PROMPT_TYPES.values()) if not t.rule for v in (_variant(t, name) for name in RUBRICS)})


def variants(type_id: str) -> list[str]:
    """The type itself and its rubric variants (a rule type has none)."""
    return [type_id, *(t.id for t in PROMPT_TYPES.values() if t.variant_of == type_id)]


DEFAULT_TYPES = [t.id for t in PROMPT_TYPES.values() if t.default]
RULE_TYPES = [t.id for t in PROMPT_TYPES.values() if t.rule]
