"""MMLU (cais/mmlu), 57-subject multiple choice. The Hub's current form: subset "all"."""

from tasks.common import HubTask, mc_conversation, evaluate_letter, require

SPLITS = ("auxiliary_train", "validation", "dev", "test")
LETTERS = ("A", "B", "C", "D")


def _parse(row):
    if "question" not in row and isinstance(row.get("train"), dict):
        row = row["train"]  # the old hub layout nests auxiliary_train rows under "train"
    require(isinstance(row["question"], str), "question must be a string")
    require(isinstance(row["choices"], list) and len(row["choices"]) == 4, "choices must be a list of exactly 4")
    require(row["answer"] in (0, 1, 2, 3), f"answer must be an index 0-3, got {row['answer']!r}")
    return row


class MMLU(HubTask):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", **kwargs):
        if subset == "auxiliary_train" and split == "train":  # accept the MID naming too
            subset, split = "all", "auxiliary_train"
        if subset != "all" or split not in SPLITS:
            raise ValueError(f"MMLU takes subset='all' and split in {SPLITS}, got {subset!r}/{split!r}")
        super().__init__("cais/mmlu", subset, split, parse=_parse, **kwargs)

    def get_example(self, index):
        row = self.row(index)
        return mc_conversation(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]],
                               subject=row.get("subject", ""))

    def evaluate(self, conversation, response):
        return evaluate_letter(conversation, response)
