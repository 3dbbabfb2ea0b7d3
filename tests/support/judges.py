"""Scripted judges for the detection and fuzzing scorers: the right answers are known, so a
scorer's arithmetic can be checked without an LLM."""

import ast
import re


class QuotedWordJudge:
    """Answers like a perfect reader of 'the word "w"' descriptions: 1 where w is in the example
    (detection) or where every marked token is w (fuzzing)."""

    name = "oracle"

    def answer(self, conversations):
        out = []
        for messages in conversations:
            user = messages[-1]["content"]
            word = re.search(r'"(\w+)"', user.splitlines()[0]).group(1)
            answers = []
            for line in (x for x in user.splitlines() if x.startswith("Example ")):
                marked = re.findall(r"<<([^>]*)>>", line)
                if marked:
                    answers.append(int(all(m.strip().lower() == word for m in marked)))
                else:
                    answers.append(int(re.search(rf"\b{word}\b", line.split(":", 1)[1], re.I) is not None))
            out.append(str(answers))
        return out


class InvertedJudge(QuotedWordJudge):
    """Always the wrong answer."""

    def answer(self, conversations):
        return [str([1 - v for v in ast.literal_eval(a)]) for a in super().answer(conversations)]


class ConstantJudge:
    """The same answer for every example."""

    name = "constant"

    def __init__(self, value: int):
        self.value = value

    def answer(self, conversations):
        return [str([self.value] * sum(line.startswith("Example ") for line in m[-1]["content"].splitlines()))
                for m in conversations]
