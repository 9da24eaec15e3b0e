"""ARC (allenai/ai2_arc), grade-school science multiple choice."""

from tasks.common import HubTask, mc_conversation, evaluate_letter, require

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


def _parse(row):
    choices = row["choices"]
    labels, texts = choices["label"], choices["text"]
    require(isinstance(row["question"], str), "question must be a string")
    require(isinstance(labels, list) and isinstance(texts, list) and len(labels) == len(texts) >= 2,
            "choices.label and choices.text must be lists of the same length (>= 2)")
    require(row["answerKey"] in labels, f"answerKey {row['answerKey']!r} is not among the labels {labels}")
    return row


class ARC(HubTask):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {SPLITS}, got {subset!r}/{split!r}")
        super().__init__("allenai/ai2_arc", subset, split, parse=_parse, **kwargs)

    def get_example(self, index):
        row = self.row(index)
        labels = row["choices"]["label"]
        return mc_conversation(row["question"], labels, row["choices"]["text"], row["answerKey"])

    def evaluate(self, conversation, response):
        return evaluate_letter(conversation, response)
